"""The quickstart example, run as a user would: `podkit up examples/quickstart.yaml`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import free_port, http_get, podkit_up

EXAMPLES = Path(__file__).parent.parent / "examples"


def status(run_dir: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "podkit", "status", "quickstart", "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PODKIT_RUN_DIR=str(run_dir)),
        timeout=30,
        check=True,
    ).stdout
    data: dict[str, object] = json.loads(out)
    return data


def test_quickstart_answers_within_5s_and_survives_a_killed_replica(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "quickstart", tmp_path / "quickstart")
    port = free_port()
    spec = tmp_path / "quickstart.yaml"
    spec.write_text(
        (EXAMPLES / "quickstart.yaml").read_text().replace("port: 8000", f"port: {port}")
    )
    run_dir = tmp_path / "run"
    url = f"http://127.0.0.1:{port}/"
    start = time.monotonic()
    log = tmp_path / "up.log"
    proc = podkit_up(spec, log, run_dir)
    try:
        while True:
            try:
                code, body = http_get(url, timeout=1)
            except OSError:
                code, body = 0, ""
            if code == 200:
                break
            assert time.monotonic() - start < 5, "no answer through the service within 5 s"
            time.sleep(0.05)
        first = json.loads(body)
        assert first["pod"].startswith("web-")
        # wait for every replica, then kill -9 one app process
        deadline = time.monotonic() + 10
        while True:
            data = status(run_dir)
            pods = data["pods"]
            assert isinstance(pods, list)
            if all(p["ready"] for p in pods) and len(pods) == 3:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        victim = pods[0]["containers"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        failures, seen = 0, set()
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end:
            try:
                code, body = http_get(url, timeout=2)
            except OSError:
                code = 0
            if code == 200:
                seen.add(json.loads(body)["pod"])
                assert "hello from" in json.loads(body)["message"]
            else:
                failures += 1
        assert failures == 0
        assert {"web-1", "web-2"} <= seen
        deadline = time.monotonic() + 10
        while True:
            app = status(run_dir)["pods"][0]["containers"][0]  # type: ignore[index]
            if app["restarts"] == 1 and app["ready"]:
                break
            assert time.monotonic() < deadline, "killed replica was not restarted"
            time.sleep(0.1)
        assert app["pid"] != victim["pid"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert f"quickstart is ready: try {url}" in out
    assert "web-0/app killed by SIGKILL; restarting" in out
