"""`podkit queue ...` as a user runs it, and the command/HTTP workers and the sources."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from podkit.workqueue import WorkQueue, sources
from podkit.workqueue.handlers import ExecHandler, HandlerFailed, render
from support import free_port

PY = sys.executable


def podkit(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "podkit", *args], capture_output=True, text=True, timeout=60, **kw
    )  # type: ignore[call-overload, no-any-return]


def test_render_fills_the_template() -> None:
    argv = render(["convert", "{}", "out/{stem}.jpg", "{name}", "{parent}"], "in/cat.png")
    assert argv == ["convert", "in/cat.png", "out/cat.jpg", "cat.png", "in"]
    assert render(["echo", "{}"], {"a": 1}) == ["echo", '{"a":1}']


async def test_exec_handler_modes_and_failures(tmp_path: Path) -> None:
    ok = await ExecHandler([PY, "-c", "import sys; print(sys.argv[1][::-1])"])("abc")
    assert ok == "cba"
    stdin = ExecHandler([PY, "-c", "import json,sys; print(json.load(sys.stdin)['n'] + 1)"],
                        mode="stdin")  # fmt: skip
    assert await stdin({"n": 41}) == 42  # stdout that parses as JSON is JSON
    as_file = ExecHandler(["cat", "{file}"], mode="file")
    assert await as_file("from a file") == "from a file"
    with pytest.raises(HandlerFailed, match=r"exited with 3: no good"):
        await ExecHandler([PY, "-c", "import sys; sys.stderr.write('no good'); sys.exit(3)"])("x")
    with pytest.raises(HandlerFailed, match=r"timed out after 0\.2s"):
        await ExecHandler(["sleep"], timeout=0.2)("5")  # the item is appended: sleep 5
    with pytest.raises(HandlerFailed, match="cannot run '/no/such'"):
        await ExecHandler(["/no/such"])("x")


def test_cli_work_acks_on_exit_0_and_dead_letters_failures(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    out = tmp_path / "out"
    out.mkdir()
    r = podkit("queue", "enqueue", "a", "b", "bad", "c", "--queue", url, "--name", "jobs")
    assert r.returncode == 0 and len(r.stdout.split()) == 4
    script = (
        "import sys,pathlib; item=sys.argv[1]; "
        "sys.exit(7) if item=='bad' else pathlib.Path(sys.argv[2],item).write_text(item)"
    )
    r = podkit(
        "queue", "work", "--queue", url, "--name", "jobs", "--exec",
        f"{PY} -c \"{script}\" {{}} {out}", "--drain", "--max-attempts", "2",
        "--retry-base", "0.05",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "done 3, failed 2" in r.stderr
    # each failed delivery is told as it happens, with the command's exit code
    failures = [line for line in r.stderr.splitlines() if " failed (delivery " in line]
    assert len(failures) == 2 and all("exited with 7" in line for line in failures)
    assert "(delivery 1)" in failures[0] and "(delivery 2)" in failures[1]
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c"]
    r = podkit("queue", "status", "--queue", url, "--name", "jobs", "--json", "--dead", "5")
    data = json.loads(r.stdout)
    assert (data["depth"], data["in_flight"], data["dead"]) == (0, 0, 1)
    assert data["dead_letters"][0]["attempts"] == 2
    assert "exited with 7" in data["dead_letters"][0]["last_error"]
    assert data["dead_letters"][0]["item"] == '"bad"'  # the item itself, not only its id
    r = podkit("queue", "status", "--queue", url, "--name", "jobs", "--dead", "5")
    assert '    item: "bad"' in r.stdout


def test_cli_work_prints_results(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    podkit("queue", "enqueue", "3", "4", "--queue", url)
    script = "import sys; print(int(sys.argv[1]) ** 2)"
    r = podkit(
        "queue", "work", "--queue", url, "--exec", f'{PY} -c "{script}" {{}}', "--drain",
        "--print-results", "--concurrency", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == ["16", "9"]


def test_cli_worker_sigterm_returns_items(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    podkit("queue", "enqueue", "30", "30", "30", "--queue", url)
    proc = subprocess.Popen(
        [PY, "-m", "podkit", "queue", "work", "--queue", url, "--exec", "sleep {}",
         "--concurrency", "3", "--grace", "0.3"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "returned 3" in err
    data = json.loads(podkit("queue", "status", "--queue", url, "--json").stdout)
    assert (data["depth"], data["in_flight"]) == (3, 0)


def test_cli_worker_prefetch_leases_ahead_and_returns_all_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    podkit("queue", "enqueue", *["30"] * 6, "--queue", url)
    proc = subprocess.Popen(
        [PY, "-m", "podkit", "queue", "work", "--queue", url, "--exec", "sleep {}",
         "--concurrency", "2", "--prefetch", "3", "--grace", "0.3"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2.5)
    data = json.loads(podkit("queue", "status", "--queue", url, "--json").stdout)
    assert (data["depth"], data["in_flight"]) == (1, 5)  # 2 running + 3 leased ahead
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    data = json.loads(podkit("queue", "status", "--queue", url, "--json").stdout)
    assert (data["depth"], data["in_flight"]) == (6, 0)  # nothing kept, nothing lost


async def test_directory_source_enqueues_settled_files_once(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    wq = await WorkQueue.open(f"sqlite:///{tmp_path / 'q.db'}", "files")
    stop = asyncio.Event()
    task = asyncio.create_task(
        sources.directory(wq, inbox, pattern="*.txt", poll=0.05, settle=0.1, stop=stop)
    )
    (inbox / "a.txt").write_text("a")
    (inbox / "b.txt").write_text("b")
    (inbox / "skip.bin").write_text("x")
    await asyncio.sleep(0.6)
    (inbox / "a.txt").write_text("a changed")  # a new version is a new item
    await asyncio.sleep(0.6)
    stop.set()
    assert await task == 3
    got = [m.payload for m in await wq.queue.dequeue(10)]
    assert sorted(json.loads(p) for p in got) == sorted(
        [str(inbox / "a.txt"), str(inbox / "a.txt"), str(inbox / "b.txt")]
    )
    await wq.close()


async def test_lines_and_schedule_sources_are_idempotent(tmp_path: Path) -> None:
    wq = await WorkQueue.open(f"sqlite:///{tmp_path / 'q.db'}", "lines")
    f = tmp_path / "urls.txt"
    f.write_text("http://a\n\nhttp://b\nhttp://c\n")
    assert await sources.lines(wq, f) == 3
    await sources.lines(wq, f)  # a restarted source
    assert (await wq.stats()).depth == 3
    stop = asyncio.Event()
    task = asyncio.create_task(sources.schedule(wq, 0.2, {"job": "tick"}, stop=stop))
    other = asyncio.create_task(sources.schedule(wq, 0.2, {"job": "tick"}, stop=stop))
    await asyncio.sleep(0.7)
    stop.set()
    await asyncio.gather(task, other)
    ticks = (await wq.stats()).depth - 3
    assert 3 <= ticks <= 5  # one per tick, not one per replica
    await wq.close()


async def test_http_source(tmp_path: Path) -> None:
    wq = await WorkQueue.open(f"sqlite:///{tmp_path / 'q.db'}", "web")
    src = sources.HTTPSource(wq, port=free_port())
    await src.start()

    def post(body: bytes, key: str | None = None) -> tuple[int, dict[str, object]]:
        req = urllib.request.Request(f"http://127.0.0.1:{src.port}/enqueue", data=body)
        if key:
            req.add_header("Idempotency-Key", key)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    code, body = await asyncio.to_thread(post, b'{"resize": "cat.png"}', "cat")
    assert code == 202 and len(body["ids"]) == 1  # type: ignore[arg-type]
    again = await asyncio.to_thread(post, b'{"resize": "cat.png"}', "cat")
    assert again[1]["ids"] == body["ids"]
    code, many = await asyncio.to_thread(post, b"[1, 2, 3]")
    assert code == 202 and len(many["ids"]) == 3  # type: ignore[arg-type]
    code, err = await asyncio.to_thread(post, b"{not json")
    assert code == 400 and "not JSON" in str(err["error"])
    assert (await wq.stats()).depth == 4
    await src.close()
    await wq.close()


async def _raw(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection; everything the server says until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_http_source_takes_a_chunked_body_and_refuses_a_bad_length(
    tmp_path: Path,
) -> None:
    wq = await WorkQueue.open(f"sqlite:///{tmp_path / 'q.db'}", "web")
    src = sources.HTTPSource(wq, port=0)
    await src.start()
    try:
        chunked = await _raw(
            src.port,
            b"POST /enqueue HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n4\r\n[1, \r\n5\r\n2, 3]\r\n0\r\n\r\n",
        )
        assert chunked.startswith(b"HTTP/1.1 202 ")
        assert (await wq.stats()).depth == 3  # every item of the chunked body enqueued
        for bad in (b"Content-Length: 1x", b"Content-Length: -1",
                    b"Content-Length: 3\r\nContent-Length: 4"):  # fmt: skip
            answer = await _raw(
                src.port, b"POST /enqueue HTTP/1.1\r\nHost: q\r\n%b\r\n\r\n[1]" % bad
            )
            assert answer.startswith(b"HTTP/1.1 400 "), (bad, answer)
            assert b"Content-Length" in answer and b"Connection: close" in answer
        huge = await _raw(
            src.port, b"POST /enqueue HTTP/1.1\r\nHost: q\r\nContent-Length: 99999999\r\n\r\n"
        )
        assert huge.startswith(b"HTTP/1.1 413 ")
        # two pipelined requests, then a malformed one: both answered, then the 400
        two = await _raw(
            src.port,
            b"POST /enqueue HTTP/1.1\r\nHost: q\r\nContent-Length: 1\r\n\r\n7"
            b"GET /enqueue HTTP/1.1\r\nHost: q\r\n\r\nBAD\r\n\r\n",
        )
        assert re.findall(rb"HTTP/1.1 (\d+) ", two) == [b"202", b"405", b"400"]
        assert (await wq.stats()).depth == 4  # nothing accepted was lost, nothing more added
    finally:
        await src.close()
        await wq.close()


def test_http_worker(tmp_path: Path) -> None:
    """`--http URL`: 2xx acks, anything else fails the item."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got: list[object] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            item = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            got.append(item)
            self.send_response(500 if item == "bad" else 200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"sqlite:///{tmp_path / 'q.db'}"
    podkit("queue", "enqueue", '"x"', '"bad"', "--queue", url)
    endpoint = f"http://127.0.0.1:{server.server_port}/"
    r = podkit(
        "queue", "work", "--queue", url, "--http", endpoint, "--drain", "--max-attempts", "1"
    )  # fmt: skip
    server.shutdown()
    assert r.returncode == 0 and "done 1, failed 1" in r.stderr
    assert sorted(map(str, got)) == ["bad", "x"]


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    r = podkit("queue", "work", "--queue", "memory://x")
    assert r.returncode == 2 and "exactly one of --exec CMD or --http URL" in r.stderr
    r = podkit("queue", "status", "--queue", "mongodb://db")
    assert r.returncode == 1 and "unknown scheme 'mongodb'" in r.stderr


def test_a_chain_of_steps_passes_each_output_on(tmp_path: Path) -> None:
    """resize -> stamp: two worker pools, the first one's stdout is the second's item."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    out = tmp_path / "stamped.txt"
    podkit("queue", "enqueue", "a.png", "b.png", "--queue", url, "--name", "resize")
    step1 = podkit("queue", "work", "--queue", url, "--name", "resize", "--then", "stamp",
                   "--exec", "echo small-{stem}.jpg", "--drain")  # fmt: skip
    assert step1.returncode == 0 and "done 2" in step1.stderr
    step2 = podkit("queue", "work", "--queue", url, "--name", "stamp",
                   "--exec", f"sh -c 'echo stamped $0 >> {out}'", "--drain")  # fmt: skip
    assert step2.returncode == 0 and "done 2" in step2.stderr
    assert sorted(out.read_text().splitlines()) == [
        "stamped small-a.jpg",
        "stamped small-b.jpg",
    ]


async def test_a_retried_step_forwards_once(tmp_path: Path) -> None:
    url = f"memory://chain-{os.getpid()}-{time.time_ns()}"
    first = await WorkQueue.open(url, "first", visibility=0.3)
    second = await WorkQueue.open(url, "second")
    await first.enqueue("x")
    (m,) = await first.queue.dequeue(visibility=0.3)
    await second.enqueue("X", key=f"from:first:{m.id}")  # forwarded, then the worker died
    await asyncio.sleep(0.4)
    stats = await first.run(lambda item: item.upper(), then=second, drain=True)
    assert stats.done == 1
    assert (await second.stats()).depth == 1


def test_cli_sources_feed_the_queue_and_stop_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    lines = tmp_path / "urls.txt"
    lines.write_text("http://a\nhttp://b\n")
    r = podkit("queue", "source", "lines", str(lines), "--queue", url, "--name", "crawl")
    assert r.returncode == 0 and "enqueued 2 line(s)" in r.stderr
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "x.png").write_bytes(b"png")
    proc = subprocess.Popen(
        [PY, "-m", "podkit", "queue", "source", "dir", str(inbox), "--queue", url,
         "--name", "crawl", "--poll", "0.1"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while json.loads(podkit("queue", "status", "--queue", url, "--name", "crawl",
                            "--json").stdout)["depth"] < 3:  # fmt: skip
        assert time.monotonic() < deadline, "the directory source enqueued nothing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "enqueued 1 file(s)" in err


def test_cli_work_counts_items_on_its_admin_port(tmp_path: Path) -> None:
    """`--admin-port`: /metrics counts what the worker did, done and failed apart."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"sqlite:///{tmp_path / 'q.db'}"
    assert podkit("queue", "enqueue", "a", "bad", "b", "--queue", url).returncode == 0
    admin = free_port()
    proc = subprocess.Popen(
        [PY, "-m", "podkit", "queue", "work", "--queue", url, "--exec",
         f"{PY} -c \"import sys; sys.exit(sys.argv[1] == 'bad')\" {{}}",
         "--max-attempts", "1", "--admin-port", str(admin)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        samples: dict[str, float] = {}
        while samples.get("podkit_queue_work_items_done_total", 0) < 2:
            assert time.monotonic() < deadline, samples
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue
            samples = {
                s.name: s.value
                for fam in text_string_to_metric_families(text)
                for s in fam.samples
                if s.labels.get("queue") == "default"
            }
        assert samples["podkit_queue_work_items_done_total"] == 2
        assert samples["podkit_queue_work_items_failed_total"] == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_status_of_a_database_that_is_not_there_says_so_and_makes_none(tmp_path: Path) -> None:
    typo = tmp_path / "typo.db"
    r = podkit("queue", "status", "--queue", f"sqlite:///{typo}")
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        == f"queue: sqlite:///{typo}: no SQLite database at {typo}: no queue is there"
    )
    assert not typo.exists()


def test_cli_work_keeps_results_where_asked(tmp_path: Path) -> None:
    import asyncio

    from podkit.workqueue import WorkQueue

    url, kept = f"sqlite:///{tmp_path / 'q.db'}", f"sqlite:///{tmp_path / 'results.db'}"
    (item_id,) = podkit("queue", "enqueue", "7", "--queue", url).stdout.split()
    script = "import sys; print(int(sys.argv[1]) * 6)"
    r = podkit(
        "queue", "work", "--queue", url, "--exec", f'{PY} -c "{script}" {{}}', "--drain",
        "--results", kept,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr

    async def result() -> object:
        wq = await WorkQueue.open(url, results=kept)
        try:
            return await wq.result(item_id, timeout=5)
        finally:
            await wq.close()

    assert asyncio.run(result()) == 42
