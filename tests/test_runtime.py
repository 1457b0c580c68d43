"""The local runtime: services, readiness, restarts, graceful shutdown and no orphans."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from podkit.system.runtime import LogSink, Runtime
from podkit.system.spec import parse_spec
from support import APPS, aget, free_port, http_get, pid_alive, unique_subnet, wait_for

PY = sys.executable
DUMP_ENV = "import json,os,sys; json.dump(dict(os.environ), open(sys.argv[1],'w'))"


def web_spec(port: int, replicas: int = 3, extra_env: str = "", extra: str = "") -> str:
    return f"""
name: web
pods:
  - name: web
    replicas: {replicas}
    containers:
      - name: app
        command: [{PY}, {APPS / "web.py"}, "$(POD_IP)", "8080"]
        env: {{LABEL: app{extra_env}}}
        ports: {{http: 8080}}
        readiness: {{http: {{path: /ready, port: http}}, period: 0.2, failure_threshold: 1}}
{extra}services:
  - name: web
    port: {port}
    pods: web
    target: http
"""


@pytest.fixture
async def runtime_for(tmp_path: Path) -> AsyncIterator[object]:
    started: list[Runtime] = []

    async def make(text: str) -> Runtime:
        rt = Runtime(
            parse_spec(text), base_dir=tmp_path, log=LogSink(io.StringIO()), subnet=unique_subnet()
        )
        await rt.start()
        started.append(rt)
        return rt

    yield make
    for rt in started:
        await rt.stop()


async def test_service_round_robins_over_ready_replicas(runtime_for) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    rt = await runtime_for(web_spec(port))
    await wait_for(lambda: len(rt.endpoints(rt.spec.services[0])) == 3, what="3 ready replicas")
    pods = [(await aget(f"http://127.0.0.1:{port}/"))[1] for _ in range(9)]
    assert sorted(set(pods)) == ["web-0", "web-1", "web-2"]
    assert all(pods.count(p) == 3 for p in set(pods))
    ips = {r.ip for r in rt.replicas}
    assert len(ips) == 3 and all(ip.startswith("127.") for ip in ips)


async def test_unready_replica_gets_no_traffic(runtime_for) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    rt = await runtime_for(web_spec(port, extra_env=", UNREADY_REPLICAS: '1'"))
    await wait_for(lambda: len(rt.endpoints(rt.spec.services[0])) == 2, what="2 ready replicas")
    await asyncio.sleep(0.5)  # the unready one keeps failing its probe
    assert not rt.replicas[1].ready
    assert rt.replicas[1].containers[0].status.state == "running"
    pods = [(await aget(f"http://127.0.0.1:{port}/"))[1] for _ in range(20)]
    assert set(pods) == {"web-0", "web-2"}
    # why it is not ready is in its status (and so in `podkit status`), and in the log
    assert rt.replicas[1].containers[0].status.message == "not ready: GET /ready: HTTP 503"
    assert rt.replicas[0].containers[0].status.message == ""
    await asyncio.sleep(0.2)  # the log's writer thread
    assert "web-1/app not ready: GET /ready: HTTP 503" in rt.log.out.getvalue()


async def test_a_service_with_no_ready_replica_answers_503_saying_so(runtime_for) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    rt = await runtime_for(web_spec(port, replicas=1, extra_env=", UNREADY_REPLICAS: '0'"))
    await wait_for(lambda: rt.replicas[0].containers[0].status.state == "running", what="run")
    status, body = await aget(f"http://127.0.0.1:{port}/", timeout=6)
    assert (status, body) == (503, "no replica of service 'web' is ready\n")
    # a client that speaks no HTTP is closed without a word
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PING\r\n")
    assert await asyncio.wait_for(reader.read(), 6) == b""
    writer.close()


async def test_killed_replica_restarts_while_the_service_keeps_answering(runtime_for) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    rt = await runtime_for(web_spec(port))
    await wait_for(lambda: len(rt.endpoints(rt.spec.services[0])) == 3, what="3 ready replicas")
    victim = rt.replicas[0].containers[0]
    old_pid = victim.status.pid
    assert old_pid is not None
    failures = 0
    answers: list[str] = []
    killed = False
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if not killed and len(answers) >= 10:
            os.kill(old_pid, signal.SIGKILL)
            killed = True
        status, body = await aget(f"http://127.0.0.1:{port}/", timeout=2)
        if status == 200:
            answers.append(body)
        else:
            failures += 1
    assert killed and failures == 0
    await wait_for(lambda: victim.status.restarts == 1 and victim.ready, what="restart")
    assert victim.status.pid not in (None, old_pid)
    assert not pid_alive(old_pid)
    await wait_for(lambda: len(rt.endpoints(rt.spec.services[0])) == 3, what="3 ready again")


async def test_liveness_failure_restarts_the_container(runtime_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flag = tmp_path / "alive"
    flag.write_text("")
    text = f"""
name: live
pods:
  - name: p
    containers:
      - name: c
        command: [sleep, "1000"]
        liveness: {{exec: {{command: [test, -e, {flag}]}}, period: 0.2, failure_threshold: 2}}
"""
    rt = await runtime_for(text)
    runner = rt.replicas[0].containers[0]
    await wait_for(lambda: runner.status.state == "running")
    await asyncio.sleep(0.6)
    assert runner.status.restarts == 0
    first = runner.status.pid
    flag.unlink()
    await wait_for(lambda: runner.status.restarts == 1, timeout=5, what="liveness restart")
    flag.write_text("")
    await wait_for(lambda: runner.status.state == "running" and runner.status.pid != first)


async def test_restart_policies(runtime_for) -> None:  # type: ignore[no-untyped-def]
    text = f"""
name: jobs
pods:
  - name: once
    restart: OnFailure
    containers: [{{name: ok, command: [{PY}, -c, "pass"]}}]
  - name: never
    restart: Never
    containers: [{{name: bad, command: [{PY}, -c, "raise SystemExit(4)"]}}]
  - name: missing
    containers: [{{name: nope, command: [/no/such/program]}}]
"""
    rt = await runtime_for(text)
    once, never, missing = (r.containers[0] for r in rt.replicas)
    await wait_for(lambda: once.status.state == "completed" and never.status.state == "failed")
    assert once.status.restarts == 0 and never.status.exit_code == 4
    await wait_for(lambda: missing.status.restarts >= 1)
    assert "cannot start '/no/such/program'" in missing.status.message or missing.status.state in (
        "backoff",
        "failed",
    )


async def test_a_system_whose_apps_crash_at_once_is_never_ready(runtime_for) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    text = f"""
name: crashy
pods:
  - name: web
    replicas: 2
    containers:
      - name: app
        command: [{PY}, -c, "raise SystemExit(3)"]
        ports: {{http: 8080}}
services:
  - {{name: web, port: {port}, pods: web, target: http}}
"""
    rt = await runtime_for(text)
    await wait_for(lambda: all(r.containers[0].status.restarts >= 3 for r in rt.replicas))
    await asyncio.sleep(1.5)  # longer than the settle time of "ready"
    rt.log.close()
    out = rt.log.out.getvalue()
    assert "crashy is ready" not in out
    assert "crashy is not ready: web-0/app exited with code 3" in out
    assert "crashy is not ready: web-1/app exited with code 3" in out
    assert out.count("is not ready") == 2  # once per container, not per restart


async def test_env_volumes_and_expansion(runtime_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "env.json"
    text = f"""
name: envs
backends: {{queue: "redis://u:secret@127.0.0.1:6379/0"}}
pods:
  - name: p
    volumes: [shared]
    containers:
      - name: c
        command: [{PY}, -c, "{DUMP_ENV}", {out}]
        env: {{GREETING: "hi $(POD_NAME) at $(POD_IP)", LITERAL: "$$(POD_IP)"}}
        volumes: {{shared: /data}}
    restart: OnFailure
"""
    rt = await runtime_for(text)
    await wait_for(lambda: rt.replicas[0].containers[0].status.state == "completed")
    env = json.loads(out.read_text())
    rep = rt.replicas[0]
    assert env["POD_NAME"] == "p-0" and env["POD_IP"] == rep.ip and env["REPLICA"] == "0"
    assert env["POD_NAMESPACE"] == "envs"
    assert env["GREETING"] == f"hi p-0 at {rep.ip}"
    assert env["LITERAL"] == "$(POD_IP)"
    assert env["PODKIT_BACKEND_QUEUE"] == "redis://u:secret@127.0.0.1:6379/0"
    assert env["PODKIT_BACKEND_STATE"].startswith("sqlite:///")
    assert Path(env["VOLUME_SHARED"]).is_dir()
    assert rt.status()["backends"]["queue"] == "redis://u:***@127.0.0.1:6379/0"


async def test_graceful_shutdown_order_and_grace_period(runtime_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    events = tmp_path / "events.log"
    text = f"""
name: order
pods:
  - name: front
    grace_period: 5
    containers:
      - name: main
        command: [{PY}, {APPS / "side.py"}]
        env: {{EVENTS: "{events}", LABEL: main, TERM_DELAY: "0.3"}}
      - name: helper
        command: [{PY}, {APPS / "side.py"}]
        env: {{EVENTS: "{events}", LABEL: helper}}
  - name: stubborn
    grace_period: 0.5
    containers:
      - name: mule
        command: [{PY}, {APPS / "web.py"}, "$(POD_IP)", "8080"]
        env: {{EVENTS: "{events}", LABEL: mule, IGNORE_TERM: "1"}}
"""
    rt = await runtime_for(text)

    def started() -> bool:
        return events.exists() and events.read_text().count(" start ") == 3

    await wait_for(started, what="3 containers started")
    mule_pid = rt.replicas[1].containers[0].status.pid
    t0 = time.monotonic()
    await rt.stop()
    took = time.monotonic() - t0
    lines = [line.split() for line in events.read_text().splitlines()]
    order = [(who, what) for _, _, who, what, *_ in lines if what != "start"]
    # last pod first; inside a pod, the last container first, each waited for
    assert order == [
        ("mule", "sigterm"),
        ("helper", "sigterm"),
        ("helper", "exit"),
        ("main", "sigterm"),
        ("main", "exit"),
    ]
    assert mule_pid is not None and not pid_alive(mule_pid)  # SIGKILLed after its grace
    assert 0.8 < took < 4


def run_file(name: str, run_dir: Path) -> Path:
    return run_dir / f"{name}.json"


@pytest.fixture
def up_process(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []
    run_dir = tmp_path / "run"

    def start(spec_text: str) -> tuple[subprocess.Popen[str], Path]:
        spec = tmp_path / "system.yaml"
        spec.write_text(spec_text)
        env = dict(os.environ, PODKIT_RUN_DIR=str(run_dir))
        proc = subprocess.Popen(
            [PY, "-m", "podkit", "up", str(spec), "--subnet", unique_subnet()],
            stdout=(tmp_path / "up.log").open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        procs.append(proc)
        return proc, run_dir

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def wait_status(run_dir: Path, name: str, replicas: int, timeout: float = 15) -> dict[str, object]:
    env = dict(os.environ, PODKIT_RUN_DIR=str(run_dir))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            [PY, "-m", "podkit", "status", name, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        if result.returncode == 0:
            data: dict[str, object] = json.loads(result.stdout)
            pods = data["pods"]
            assert isinstance(pods, list)
            if len(pods) == replicas and all(p["ready"] for p in pods):
                return data
        time.sleep(0.2)
    raise AssertionError(f"{name} not ready in {timeout}s")


def all_pids(status: dict[str, object]) -> list[int]:
    pods = status["pods"]
    assert isinstance(pods, list)
    return [c["pid"] for p in pods for c in p["containers"] if c["pid"]]


def spec_with_grandchildren(events: Path, port: int) -> str:
    return web_spec(port, replicas=2, extra_env=f", CHILD: '1', EVENTS: '{events}'")


def grandchild_pids(events: Path) -> list[int]:
    return [int(line.split()[4]) for line in events.read_text().splitlines() if " child " in line]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_process_outlives_podkit_up(up_process, tmp_path: Path, how: str) -> None:  # type: ignore[no-untyped-def]
    events = tmp_path / "events.log"
    port = free_port()
    proc, run_dir = up_process(spec_with_grandchildren(events, port))
    status = wait_status(run_dir, "web", 2)
    pids = all_pids(status)
    children = grandchild_pids(events)
    assert len(pids) == 2 and len(children) == 2
    assert all(pid_alive(p) for p in pids + children)
    assert http_get(f"http://127.0.0.1:{port}/")[0] == 200
    os.kill(proc.pid, getattr(signal, how))
    proc.wait(timeout=15)
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids + children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids + children if pid_alive(p)] == []
    if how != "SIGKILL":
        assert proc.returncode == 0
        assert not run_file("web", run_dir).exists()


def test_status_shows_pods_and_services(up_process) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    proc, run_dir = up_process(web_spec(port, replicas=2))
    wait_status(run_dir, "web", 2)
    env = dict(os.environ, PODKIT_RUN_DIR=str(run_dir), COLUMNS="200")
    result = subprocess.run(
        [PY, "-m", "podkit", "status"], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "web-0" in result.stdout and "web-1" in result.stdout
    assert "http:8080" in result.stdout  # the pod's named ports, as promised
    assert f"service web: http://127.0.0.1:{port}/ ->" in result.stdout
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    result = subprocess.run(
        [PY, "-m", "podkit", "status"], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 1 and "no running podkit system" in result.stderr


def test_up_reports_a_busy_service_port(up_process) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc, run_dir = up_process(web_spec(port, replicas=1))
        proc.wait(timeout=30)
    out = (run_dir.parent / "up.log").read_text()
    assert proc.returncode == 1
    assert f"service 'web': cannot listen on 127.0.0.1:{port}" in out


def test_service_urls_say_https_for_tls_services(tmp_path: Path) -> None:
    spec = parse_spec(f"""
name: tls
pods:
  - name: web
    containers:
      - name: app
        command: [{PY}, app.py]
        ports: {{http: 8080}}
      - name: tls
        component: sidecar.tls
        with: {{upstream: "8080", listen: "$(POD_IP):8443", self_signed: true}}
        ports: {{https: 8443}}
services:
  - {{name: secure, port: 9443, pods: web, target: https}}
  - {{name: by-number, port: 9444, pods: web, target: 8443}}
  - {{name: plain, port: 9080, pods: web, target: http}}
  - {{name: edge, port: 9445, pods: web, target: http, lb: {{tls: {{self_signed: true}}}}}}
""")
    log = LogSink(io.StringIO())
    try:
        rt = Runtime(spec, base_dir=tmp_path, log=log)
        urls = {s["name"]: s["url"] for s in rt.status()["services"]}
    finally:
        log.close()
    assert urls == {
        "secure": "https://127.0.0.1:9443/",
        "by-number": "https://127.0.0.1:9444/",
        "plain": "http://127.0.0.1:9080/",
        "edge": "https://127.0.0.1:9445/",
    }


def test_exits_are_told_by_code_or_by_signal() -> None:
    from podkit.system.runtime import exit_text

    assert exit_text(3) == "exited with code 3"
    assert exit_text(-9) == "killed by SIGKILL"
    assert exit_text(-15) == "killed by SIGTERM"


async def test_a_system_not_ready_after_its_start_window_names_who_and_why(
    tmp_path: Path,
) -> None:
    port = free_port()
    out = io.StringIO()
    spec = parse_spec(web_spec(port, replicas=2, extra_env=", UNREADY_REPLICAS: '1'"))
    rt = Runtime(
        spec, base_dir=tmp_path, log=LogSink(out), subnet=unique_subnet(), start_window=1.5
    )
    await rt.start()
    try:
        await asyncio.sleep(2.5)
        assert (
            "web is not ready after 1.5s: web-1/app (not ready: GET /ready: HTTP 503)"
            in out.getvalue()
        )
        assert "web-0/app (" not in out.getvalue()  # the ready replica is not named
    finally:
        await rt.stop()
