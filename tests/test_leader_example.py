"""examples/leader.yaml under `podkit up`: one of three replicas runs the singleton job."""

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


def test_leader_example_runs_one_job_and_fails_over(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "leader", tmp_path / "leader")
    port = free_port()
    spec = tmp_path / "leader.yaml"
    spec.write_text((EXAMPLES / "leader.yaml").read_text().replace("port: 8001", f"port: {port}"))
    log = tmp_path / "up.log"
    env = dict(os.environ, PODKIT_RUN_DIR=str(tmp_path / "run"))
    proc = podkit_up(spec, log, tmp_path / "run")
    try:
        deadline = time.monotonic() + 20
        leader: dict[str, object] = {}
        while not leader:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                code, body = http_get(f"http://127.0.0.1:{port}/leader", timeout=1)
                if code == 200:
                    leader = json.loads(body)
            except OSError:
                pass
            time.sleep(0.1)
        time.sleep(2.5)
        ticks = [line for line in log.read_text().splitlines() if " leads with token " in line]
        assert len(ticks) >= 2
        assert {line.split(" leads ")[0].split("| ")[-1] for line in ticks} == {leader["identity"]}
        # kill -9 the leader's elector: another replica's job takes over
        status = json.loads(
            subprocess.run(
                [sys.executable, "-m", "podkit", "status", "leader", "--json"],
                capture_output=True, text=True, env=env, check=True, timeout=30,
            ).stdout
        )  # fmt: skip
        pod = next(p for p in status["pods"] if p["name"] == leader["identity"])
        elector = next(c for c in pod["containers"] if c["name"] == "elector")
        os.kill(elector["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            code, body = http_get(f"http://127.0.0.1:{port}/leader", timeout=2)
            now = json.loads(body) if code == 200 else {}
            if now and now["identity"] != leader["identity"]:
                break
            assert time.monotonic() < deadline, "no new leader"
            time.sleep(0.1)
        assert int(str(now["token"])) > int(str(leader["token"]))
        deadline = time.monotonic() + 5
        while f"{now['identity']} leads with token {now['token']}" not in log.read_text():
            assert time.monotonic() < deadline, "the new leader did not run the job"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
