"""The logs adapter: every format into one schema, tracebacks attached, nothing dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from podkit.adapter.logs import LogParser, parse_line
from support import free_port, podkit_error, port_in_use

PODKIT = [sys.executable, "-m", "podkit"]
KEYS = {"time", "level", "message", "format", "parsed", "fields"}


def test_combined_access_log() -> None:
    r = parse_line(
        '10.0.0.7 - alice [25/Nov/2026:01:02:03 +0100] "POST /api/items?id=4 HTTP/1.1" 503 '
        '612 "https://shop.example/cart" "curl/8.5.0"'
    )
    assert r["format"] == "combined" and r["parsed"]
    assert r["time"] == "2026-11-25T01:02:03+01:00"
    assert r["level"] == "error"  # a 5xx
    f = r["fields"]
    assert (f["remote_addr"], f["user"], f["method"], f["path"]) == (
        "10.0.0.7", "alice", "POST", "/api/items?id=4")  # fmt: skip
    assert (f["status"], f["bytes"], f["referer"], f["user_agent"]) == (
        503, 612, "https://shop.example/cart", "curl/8.5.0")  # fmt: skip


def test_common_access_log_with_dashes() -> None:
    r = parse_line('::1 - - [25/Nov/2026:01:02:03 +0000] "GET / HTTP/1.0" 404 -')
    assert r["format"] == "common" and r["level"] == "warning"
    assert r["fields"]["bytes"] is None and r["fields"]["user"] is None


def test_a_garbage_request_line_keeps_the_record() -> None:
    r = parse_line('1.2.3.4 - - [25/Nov/2026:01:02:03 +0000] "\\x16\\x03\\x01" 400 0 "-" "-"')
    assert r["format"] == "combined" and r["fields"]["status"] == 400
    assert "method" not in r["fields"] and r["fields"]["request"]


def test_json_lines() -> None:
    r = parse_line('{"@timestamp": "2026-11-25T01:02:03.5Z", "severity": "WARN", '
                   '"message": "slow query", "ms": 812, "db": "orders"}')  # fmt: skip
    assert (r["format"], r["level"], r["message"]) == ("json", "warning", "slow query")
    assert r["time"] == "2026-11-25T01:02:03.500000+00:00"
    assert r["fields"] == {"ms": 812, "db": "orders"}
    epoch = parse_line('{"ts": 1764032523000, "level": 40, "msg": "x"}')  # ms, logging number
    assert epoch["time"] == "2025-11-25T01:02:03+00:00" and epoch["level"] == "error"


def test_logfmt() -> None:
    r = parse_line('ts=2026-11-25T01:02:03Z level=error msg="db down: \\"orders\\"" retry=3')
    assert (r["format"], r["level"], r["message"]) == ("logfmt", "error", 'db down: "orders"')
    assert r["fields"] == {"retry": "3"}


@pytest.mark.parametrize(
    ("line", "level", "logger", "message"),
    [
        ("WARNING:root:disk almost full", "warning", "root", "disk almost full"),
        ("2026-11-25 01:02:03,456 INFO app.web: listening on 8080", "info", "app.web",
         "listening on 8080"),
        ("2026-11-25 01:02:03,456 - worker - ERROR - job 7 failed", "error", "worker",
         "job 7 failed"),
        ("[2026-11-25 01:02:03 +0000] [42] [INFO] Booting worker", "info", None,
         "Booting worker"),
    ],
)  # fmt: skip
def test_python_logging_layouts(line: str, level: str, logger: str | None, message: str) -> None:
    r = parse_line(line)
    assert (r["format"], r["level"], r["message"]) == ("python", level, message)
    assert r["fields"].get("logger") == logger


def test_a_traceback_joins_its_record() -> None:
    text = """2026-11-25 01:02:03,456 ERROR app: request failed
Traceback (most recent call last):
  File "app.py", line 3, in handle
    1 / 0
ZeroDivisionError: division by zero

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "app.py", line 5, in handle
KeyError: 'x'
127.0.0.1 - - [25/Nov/2026:01:02:04 +0000] "GET / HTTP/1.1" 200 5
INFO:app:next"""
    p = LogParser()
    out = [r for line in text.splitlines() for r in p.feed(line)] + p.flush()
    assert [r["format"] for r in out] == ["python", "common", "python"]
    exc = out[0]["fields"]["exc_info"]
    assert exc.startswith("Traceback") and exc.endswith("KeyError: 'x'")
    assert "ZeroDivisionError" in exc and exc.count("Traceback") == 2


def test_unparsable_lines_are_kept_whole() -> None:
    for line in ["", "   ", "hello world", "{not json", "a=1", "[1, 2]", "x=1 y"]:
        r = parse_line(line)
        assert r == {"time": None, "level": None, "message": line, "format": "raw",
                     "parsed": False, "fields": {}}  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_any_text_gives_a_record_and_loses_nothing(text: str) -> None:
    line = text.replace("\n", " ").replace("\r", " ")
    r = parse_line(line)
    assert set(r) == KEYS
    json.dumps(r)  # always serialisable
    if not r["parsed"]:
        assert r["message"] == line


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    "INFO:a:b", "Traceback (most recent call last):", '  File "x", line 1', "ValueError: v",
    "", "plain", '{"msg": "j"}', "k=v level=info",
]), max_size=30))  # fmt: skip
def test_the_parser_emits_one_record_per_start_line(lines: list[str]) -> None:
    p = LogParser()
    out = [r for line in lines for r in p.feed(line)] + p.flush()
    attached = sum(1 for r in out for _ in r["fields"].get("exc_info", "").split("\n")
                   if "exc_info" in r["fields"])  # fmt: skip
    assert len(out) + attached == len(lines)  # every line is a record or part of one


# -- the command --------------------------------------------------------------------------

APP = r"""
import logging, sys, time
logging.basicConfig(stream=sys.stdout, level=logging.INFO)
print('127.0.0.1 - - [25/Nov/2026:01:02:03 +0000] "GET / HTTP/1.1" 200 12', flush=True)
logging.getLogger("svc").warning("cache cold")
try:
    {}["k"]
except KeyError:
    logging.getLogger("svc").exception("lookup failed")
print("free text", flush=True)
print('{"msg": "bye", "level": "info"}', flush=True)
sys.exit(3)
"""


def test_command_mode_wraps_an_app_and_keeps_its_exit_code(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP)
    run = subprocess.run([*PODKIT, "adapter", "logs", "--", sys.executable, str(app)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert run.returncode == 3, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["format"] for r in records] == ["common", "python", "python", "raw", "json"]
    assert "KeyError" in records[2]["fields"]["exc_info"]
    assert all(r["source"] == sys.executable for r in records)


def test_file_mode_follows_rotation_and_truncation(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    out = tmp_path / "out.jsonl"
    log.write_text("old line before start\n")
    proc = subprocess.Popen([*PODKIT, "adapter", "logs", "--file", str(log), "--output",
                             str(out)], stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    assert "following" in proc.stderr.readline()  # opened, at its end

    def seen() -> list[dict[str, object]]:
        return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []

    def wait_for(n: int) -> list[dict[str, object]]:
        deadline = time.monotonic() + 10
        while len(got := seen()) < n:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        return got

    try:
        with log.open("a") as f:
            f.write("one=1 two=2\n")
        wait_for(1)
        os.rename(log, tmp_path / "app.log.1")  # rotation: a new file appears
        log.write_text("after=rotation level=info\n")
        wait_for(2)
        log.write_text("")  # truncation in place
        with log.open("a") as f:
            f.write("WARNING:x:after truncation\n")
        got = wait_for(3)
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()
    assert [r["message"] if r["format"] == "python" else r["fields"] for r in got] == [
        {"one": "1", "two": "2"}, {"after": "rotation"}, "after truncation"]  # fmt: skip


APP_LOG = """\
127.0.0.1 - - [25/Nov/2026:01:02:03 +0000] "GET / HTTP/1.1" 200 12
ERROR:svc:lookup failed
Traceback (most recent call last):
  File "app.py", line 5, in <module>
KeyError: 'k'
free text
"""


def test_stdin_from_a_file_gives_what_a_pipe_gives(tmp_path: Path) -> None:
    # more lines than the adapter queues at once, a traceback and a last line without \n
    text = APP_LOG + "".join(f"n={i} level=info\n" for i in range(12_000)) + "tail=1 end=no-nl"
    log = tmp_path / "app.log"
    log.write_text(text)
    piped = subprocess.run([*PODKIT, "adapter", "logs"], input=text, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    with log.open() as stdin:
        from_file = subprocess.run([*PODKIT, "adapter", "logs"], stdin=stdin,
                                   capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (from_file.returncode, from_file.stderr) == (0, "")
    assert from_file.stdout == piped.stdout
    records = [json.loads(line) for line in from_file.stdout.splitlines()]
    assert len(records) == 3 + 12_000 + 1
    assert "KeyError" in records[1]["fields"]["exc_info"]
    assert records[-1]["fields"] == {"tail": "1", "end": "no-nl"}


def test_stdin_from_dev_null_is_empty_input() -> None:
    with open(os.devnull) as stdin:
        run = subprocess.run([*PODKIT, "adapter", "logs"], stdin=stdin, capture_output=True,
                             text=True, timeout=30)  # fmt: skip
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


def test_stdin_closed_is_empty_input() -> None:
    """`podkit adapter logs <&-`: no descriptor 0 at all (uvloop used to abort)."""
    run = subprocess.run([*PODKIT, "adapter", "logs"], preexec_fn=lambda: os.close(0),
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


def test_a_command_that_cannot_run_is_a_one_line_error() -> None:
    assert podkit_error(["adapter", "logs", "--", "/nonexistent/cmd", "-x"]) == (
        127,
        "adapter: cannot run '/nonexistent/cmd': No such file or directory",
    )


def test_the_admin_port_counts_lines_read_written_and_unparsed(tmp_path: Path) -> None:
    """APP_LOG's 6 lines make 3 records (a traceback joins its record), 1 of them raw."""
    log = tmp_path / "app.log"
    log.write_text(APP_LOG)
    admin = free_port()
    proc = subprocess.Popen([*PODKIT, "adapter", "logs", "--file", str(log), "--from-start",
                             "--output", str(tmp_path / "out.jsonl"), "--admin-port", str(admin)],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    get = urllib.request.build_opener(urllib.request.ProxyHandler({})).open
    want = {"lines_read": 6, "lines_written": 3, "lines_unparsed": 1}
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with get(f"http://127.0.0.1:{admin}/metrics", timeout=2) as resp:
                    text = resp.read().decode()
                samples = {s.name: s.value for f in text_string_to_metric_families(text)
                           for s in f.samples}  # fmt: skip
                got = {k: samples[f"podkit_adapter_logs_{k}_total"] for k in want}
                if got == want:
                    break
            except OSError:
                got = None
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
        with get(f"http://127.0.0.1:{admin}/status", timeout=2) as resp:
            assert json.loads(resp.read()) == {"source": str(log), **want}
        with get(f"http://127.0.0.1:{admin}/readyz", timeout=2) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_an_admin_port_in_use_is_a_one_line_error() -> None:
    with port_in_use() as port:
        assert podkit_error(["adapter", "logs", "--admin-port", str(port)]) == (
            1,
            f"adapter: cannot listen on 127.0.0.1:{port} (--admin-port): Address already in use",
        )
