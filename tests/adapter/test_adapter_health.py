"""The health adapter against real servers: a private PostgreSQL that is stopped, the
machine's MariaDB, a Redis replica whose primary dies, HTTP and command checks."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from podkit.adapter.health import CheckConfig, HealthMonitor
from servers import PostgresServer, RedisServer
from support import TinyHTTP, free_port, podkit_error, port_in_use

PODKIT = [sys.executable, "-m", "podkit"]
MARIADB = "mysql://root@127.0.0.1:3306/test"


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


def test_readyz_flips_to_503_within_one_interval_after_the_database_stops(
    postgres: PostgresServer,
) -> None:
    interval = 0.5
    port = free_port()
    proc = subprocess.Popen(
        [*PODKIT, "adapter", "health", "--sql", postgres.url, "--interval", str(interval),
         "--port", str(port)], stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = get(f"{base}/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        assert body["checks"][0]["ok"] and "SELECT 1" in body["checks"][0]["detail"]
        assert get(f"{base}/healthz")[0] == 200  # no liveness checks: the adapter is alive
        flips = []
        for _ in range(3):  # the stop lands at a different phase of the interval each time
            postgres.stop()
            stopped = time.monotonic()
            while get(f"{base}/readyz")[0] != 503:
                assert time.monotonic() - stopped < 5, "still 200 after the database stopped"
                time.sleep(0.01)
            flips.append(time.monotonic() - stopped)
            status, body = get(f"{base}/readyz")
            assert body["status"] == "fail" and body["failed"] == [f"sql {postgres.url}"]
            assert body["checks"][0]["error"]
            postgres.start()
            restarted = time.monotonic()
            while get(f"{base}/readyz")[0] != 200:
                assert time.monotonic() - restarted < 5, "not ready again after the restart"
                time.sleep(0.01)
        print(f"flip to 503 after {', '.join(f'{f:.3f}' for f in flips)} s (interval {interval})")
        assert max(flips) <= interval + 0.15
    finally:
        proc.terminate()
        proc.wait(10)


def run_round(checks: list[dict[str, Any]], interval: float = 1.0) -> HealthMonitor:
    async def main() -> HealthMonitor:
        m = HealthMonitor([CheckConfig.model_validate(c) for c in checks], interval)
        await m.run_once()
        await m.close()
        return m

    return asyncio.run(main())


def mariadb_up() -> None:
    try:
        socket.create_connection(("127.0.0.1", 3306), timeout=1).close()
    except OSError:
        msg = "MariaDB is not running on 127.0.0.1:3306 (start it: mariadbd)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def test_mysql_query_and_expectation() -> None:
    mariadb_up()
    m = run_round([
        {"name": "version", "sql": MARIADB, "query": "SELECT VERSION()", "expect": "MariaDB"},
        {"name": "wrong", "sql": MARIADB, "query": "SELECT 41 + 1", "expect": "^41$"},
        {"name": "nodb", "sql": "mysql://root@127.0.0.1:3306/no_such_db"},
    ])  # fmt: skip
    status, body = m.report("ready")
    assert status == 503 and body["failed"] == ["wrong", "nodb"]
    rows = {c["name"]: c for c in body["checks"]}
    assert rows["version"]["ok"] and "MariaDB" in rows["version"]["detail"]
    assert "'42' does not match" in rows["wrong"]["error"]
    assert "no_such_db" in rows["nodb"]["error"]


def test_redis_replica_fails_when_its_primary_dies() -> None:
    primary = RedisServer()
    primary.start()
    replica = RedisServer(extra_args=["--replicaof", primary.host, str(primary.port)])
    replica.start()
    try:
        checks = [{"name": "primary", "redis": primary.url},
                  {"name": "replica", "redis": replica.url, "max_lag": 5}]  # fmt: skip
        deadline = time.monotonic() + 10
        while (m := run_round(checks)).report("ready")[0] != 200:  # until the sync is done
            assert time.monotonic() < deadline, m.report("ready")
            time.sleep(0.1)
        rows = {c["name"]: c for c in m.report("ready")[1]["checks"]}
        assert rows["primary"]["detail"] == "master, 1 replicas"
        assert rows["replica"]["detail"].startswith("replica of 127.0.0.1")
        primary.kill()
        deadline = time.monotonic() + 10
        while (m := run_round(checks)).report("ready")[0] != 503 or len(
            m.report("ready")[1]["failed"]) < 2:  # fmt: skip
            assert time.monotonic() < deadline, m.report("ready")
            time.sleep(0.1)
        rows = {c["name"]: c for c in m.report("ready")[1]["checks"]}
        assert "link to the master is down" in rows["replica"]["error"]
        assert "Connect" in rows["primary"]["error"] or "refused" in rows["primary"]["error"]
    finally:
        replica.remove()
        primary.remove()


@pytest.fixture
def web() -> Iterator[str]:
    server = TinyHTTP(
        lambda path: (
            (200, b'{"db": "ok", "queue": "degraded"}') if path == "/status" else (410, b"gone")
        )
    )
    yield server.url
    server.close()


def test_http_status_and_body_match(web: str) -> None:
    m = run_round([
        {"name": "db", "http": f"{web}/status", "expect": '"db": "ok"'},
        {"name": "queue", "http": f"{web}/status", "expect": '"queue": "ok"'},
        {"name": "gone", "http": f"{web}/old"},
        {"name": "gone-ok", "http": f"{web}/old", "status": 410},
    ])  # fmt: skip
    status, body = m.report("ready")
    assert status == 503 and body["failed"] == ["queue", "gone"]
    assert "HTTP 410" in {c["name"]: c for c in body["checks"]}["gone"]["error"]


def test_command_checks_exit_status_and_timeout(tmp_path: Path) -> None:
    flag = tmp_path / "ok"
    checks = [
        {"name": "flag", "command": ["test", "-f", str(flag)], "liveness": True},
        {"name": "slow", "command": "sleep 30", "timeout": 0.3},
    ]
    m = run_round(checks)
    assert m.report("live") == (503, m.report("live")[1])
    assert m.report("live")[1]["failed"] == ["flag"]  # /healthz: liveness checks only
    assert "no answer within 0.3 s" in m.results["slow"].detail
    assert m.results["slow"].ms < 2000  # the sleep was killed, not waited for
    flag.touch()
    m = run_round(checks)
    assert m.report("live")[0] == 200 and m.report("ready")[1]["failed"] == ["slow"]


def test_a_bad_config_is_refused_with_where(tmp_path: Path) -> None:
    cfg = tmp_path / "health.yaml"
    cfg.write_text(
        "interval: 1\nchecks:\n  - {sql: 'redis://x', name: db}\n  - {http: u, bogus: 1}\n"
    )
    run = subprocess.run([*PODKIT, "adapter", "health", "--config", str(cfg)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2
    # each problem with the file, the line and column of the offending entry, and its path
    assert f"{cfg}:3:5: checks[0]: " in run.stderr
    assert "not a postgresql:// or mysql:// URL" in run.stderr
    assert f"{cfg}:4:15: checks[1].bogus: " in run.stderr
    # a misspelt field gets the closest one, as a spec does
    cfg.write_text("intervall: 1\nchecks:\n  - {http: 'http://h/', expekt: ok}\n")
    run = subprocess.run([*PODKIT, "adapter", "health", "--config", str(cfg)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2
    assert "intervall: unknown field 'intervall' (did you mean 'interval'?)" in run.stderr
    assert "checks[0].expekt: unknown field 'expekt' (did you mean 'expect'?)" in run.stderr
    cfg.write_text("interval: 1\nchecks:\n  - command: [sleep\n")
    run = subprocess.run([*PODKIT, "adapter", "health", "--config", str(cfg)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and f"{cfg}:4:1: invalid YAML: " in run.stderr


def test_a_port_in_use_is_a_one_line_error() -> None:
    argv = ["adapter", "health", "--http", "http://127.0.0.1:1/"]
    with port_in_use() as port:
        error = f"adapter: cannot listen on 127.0.0.1:{port} (--port): Address already in use"
        assert podkit_error([*argv, "--port", str(port)]) == (1, error)
