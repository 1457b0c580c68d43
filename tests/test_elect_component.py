"""`podkit elect` as a user runs it: three electors, /leader and /me, --exec, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import free_port, http_get, pid_alive

TTL = 1.0


@pytest.fixture
def electors(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], int, Path]]]:
    backend = f"sqlite:///{tmp_path / 'state.db'}"
    procs: list[tuple[subprocess.Popen[bytes], int, Path]] = []
    for i in range(3):
        port = free_port()
        marker = tmp_path / f"job-{i}.pid"
        job = f"sh -c 'echo $$ > {marker}; echo $PODKIT_LEADER_TOKEN >> {marker}; exec sleep 1000'"
        proc = subprocess.Popen(
            [sys.executable, "-m", "podkit", "elect", "--backend", backend, "--name", "cron",
             "--identity", f"e{i}", "--ttl", str(TTL), "--port", str(port), "--exec", job],
            stderr=(tmp_path / f"elector-{i}.log").open("wb"),
        )  # fmt: skip
        procs.append((proc, port, marker))
    deadline = time.monotonic() + 15
    for _, port, _ in procs:
        while get(port, "/healthz")[0] != 200:
            assert time.monotonic() < deadline, "electors did not start"
            time.sleep(0.05)
    yield procs
    for proc, _, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _, _ in procs:
        proc.wait(timeout=10)


def get(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        code, body = http_get(f"http://127.0.0.1:{port}{path}", timeout=2)
    except OSError:
        return 0, {}
    return code, json.loads(body)


def wait_leader(ports: list[int], exclude: str | None = None, timeout: float = 10) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in ports:
            code, body = get(port, "/leader")
            if code == 200 and body["identity"] != exclude:
                return body
        time.sleep(0.02)
    raise AssertionError("no leader")


def test_one_leader_runs_the_command_and_kill_9_fails_over(electors) -> None:  # type: ignore[no-untyped-def]
    ports = [p for _, p, _ in electors]
    leader = wait_leader(ports)
    index = int(str(leader["identity"])[1])
    proc, port, marker = electors[index]
    # /me agrees, on every elector
    deadline = time.monotonic() + 5
    while not marker.exists() or len(marker.read_text().split()) < 2:
        assert time.monotonic() < deadline, "the leader did not start its command"
        time.sleep(0.02)
    mes = [get(p, "/me")[1] for p in ports]
    assert [m["leader"] for m in mes].count(True) == 1
    assert mes[index] == {"identity": leader["identity"], "leader": True, "token": leader["token"]}
    job_pid, job_token = (int(x) for x in marker.read_text().split())
    assert job_token == leader["token"]
    assert [m.exists() for _, _, m in electors].count(True) == 1  # nobody else ran it
    # kill -9 the leading elector: its command dies with it, another takes over
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    others = [p for p in ports if p != port]
    new = wait_leader(others, exclude=str(leader["identity"]))
    took = time.monotonic() - killed_at
    assert int(str(new["token"])) > int(str(leader["token"]))
    assert took < TTL + 1.0, f"failover took {took:.2f}s"
    deadline = time.monotonic() + 3
    while pid_alive(job_pid):
        assert time.monotonic() < deadline, "the old leader's command outlived it"
        time.sleep(0.02)


def test_sigterm_stops_the_command_and_hands_over(electors) -> None:  # type: ignore[no-untyped-def]
    ports = [p for _, p, _ in electors]
    leader = wait_leader(ports)
    index = int(str(leader["identity"])[1])
    proc, port, marker = electors[index]
    deadline = time.monotonic() + 5
    while not marker.exists() or len(marker.read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job_pid = int(marker.read_text().split()[0])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert not pid_alive(job_pid)
    start = time.monotonic()
    new = wait_leader([p for p in ports if p != port], exclude=str(leader["identity"]))
    assert time.monotonic() - start < 1.0  # resigned: no need to wait for the TTL
    assert int(str(new["token"])) > int(str(leader["token"]))


def test_a_command_that_fails_at_once_is_restarted_with_back_off(tmp_path: Path) -> None:
    """`--exec false`: each quick exit doubles the pause before the next campaign
    (0.5, 1, 2 s...), so in 3 s the command runs about 3 times, not hundreds."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "podkit", "elect", "--backend", "memory://backoff",
         "--name", "job", "--exec", f"sh -c 'echo x >> {runs}; exit 3'"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(3.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    count = len(runs.read_text().splitlines())
    assert 2 <= count <= 4, (count, err)
    assert "command exited with 3 after" in err and "campaigning again in 1s" in err


def test_candidates_on_one_machine_have_different_identities() -> None:
    env = {k: v for k, v in os.environ.items() if k != "POD_NAME"}
    elect = [sys.executable, "-m", "podkit", "elect", "--backend", "memory://ids", "--name", "j"]
    procs = [subprocess.Popen(elect, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        names = []
        for p in procs:
            assert p.stderr is not None
            names.append(p.stderr.readline().split(" ")[1])  # "elect: <identity> campaigning"
        assert names[0] != names[1]
        assert all(n.endswith(f"-{p.pid}") for p, n in zip(procs, names, strict=True))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
