"""The metrics adapter on real servers: Redis INFO, PostgreSQL statistics views and a
JSON stats endpoint become Prometheus metrics that follow what the app does."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from podkit.adapter.metrics import (
    Exporter,
    JSONMapping,
    JSONSource,
    PostgresSource,
    RedisSource,
    parse_redis_info,
)
from servers import PostgresServer, RedisServer
from support import TinyHTTP, free_port, podkit_error, port_in_use

PODKIT = [sys.executable, "-m", "podkit"]


def values(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse exposition text like Prometheus does: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def scrape(exporter: Exporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return values(asyncio.run(exporter.scrape()))


def test_redis_info_follows_the_server(redis_server: RedisServer) -> None:
    r = redis.Redis(host=redis_server.host, port=redis_server.port, db=3)
    r.flushdb()

    async def twice() -> tuple[bytes, bytes]:
        exporter = Exporter(RedisSource(redis_server.url))
        first = await exporter.scrape()
        r.mset({f"m{i}": i for i in range(25)})
        r.expire("m0", 100)
        for _ in range(10):
            r.get("m1")
        second = await exporter.scrape()
        await exporter.source.close()
        return first, second

    first, second = map(values, asyncio.run(twice()))
    up = ("podkit_adapter_up", (("source", "redis"),))
    assert first[up] == second[up] == 1.0
    assert second["redis_db_keys", (("db", "db3"),)] == 25
    assert second["redis_db_expiring_keys", (("db", "db3"),)] == 1
    calls = ("redis_command_calls_total", (("cmd", "get"),))
    assert second[calls] - first.get(calls, 0) == 10
    processed = ("redis_commands_processed_total", ())
    assert second[processed] >= first[processed] + 12
    assert second["redis_connected_clients", ()] >= 1
    info = [k for k in second if k[0] == "redis_instance_info"]
    assert info and dict(info[0][1])["role"] == "master"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_info_parser_never_fails(text: str) -> None:
    samples = parse_redis_info(text)
    assert samples[-1].name == "redis_instance_info"
    assert all(isinstance(s.value, float) for s in samples)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


def test_postgres_stats_follow_the_database(postgres: PostgresServer) -> None:
    def psql(sql: str) -> None:
        subprocess.run(["psql", postgres.url, "-q", "-c", sql], check=True, capture_output=True)

    psql("CREATE TABLE IF NOT EXISTS items (id int)")

    async def run() -> tuple[dict, dict]:  # type: ignore[type-arg]
        exporter = Exporter(PostgresSource(postgres.url))
        before = values(await exporter.scrape())
        psql("INSERT INTO items SELECT generate_series(1, 137)")
        key = ("pg_stat_database_tup_inserted_total", (("datname", "postgres"),))
        deadline = time.monotonic() + 5  # the server publishes its counters within a second
        while True:
            after = values(await exporter.scrape())
            if after[key] - before[key] >= 137 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        await exporter.source.close()
        return before, after

    before, after = asyncio.run(run())
    db = (("datname", "postgres"),)
    assert after["pg_stat_database_tup_inserted_total", db] - before[
        "pg_stat_database_tup_inserted_total", db] == 137  # fmt: skip
    assert after["pg_stat_database_xact_commit_total", db] > before[
        "pg_stat_database_xact_commit_total", db]  # fmt: skip
    assert after["pg_stat_database_numbackends", db] >= 1  # the exporter itself
    assert after["pg_database_size_bytes", db] > 1_000_000
    assert after["pg_up_since_seconds", ()] > 0
    assert after["podkit_adapter_up", (("source", "postgres"),)] == 1.0


def test_a_stopped_database_reads_as_down_and_recovers(postgres: PostgresServer) -> None:
    async def run() -> list[float]:
        exporter = Exporter(PostgresSource(postgres.url, timeout=1), timeout=2)
        ups = [values(await exporter.scrape())["podkit_adapter_up", (("source", "postgres"),)]]
        postgres.stop()
        down = values(await exporter.scrape())
        ups.append(down["podkit_adapter_up", (("source", "postgres"),)])
        assert not any(k[0].startswith("pg_stat") for k in down)  # no stale values
        assert exporter.last_error
        postgres.start()
        ups.append(values(await exporter.scrape())["podkit_adapter_up", (("source", "postgres"),)])
        await exporter.source.close()
        return ups

    assert asyncio.run(run()) == [1.0, 0.0, 1.0]


STATS = {
    "uptime": 42.5,
    "healthy": True,
    "queues": {"mail": {"depth": 3, "workers": 2}, "sms": {"depth": 0, "workers": 1}},
    "shards": [{"hits": 10}, {"hits": 20}],
    "version": "1.2.3",
}
MAPPING = """
metrics:
  - {name: app_uptime_seconds, path: uptime}
  - {name: app_healthy, path: healthy}
  - {name: app_queue_depth, path: queues.*.depth, labels: [queue], help: Items waiting.}
  - {name: app_shard_hits_total, type: counter, path: shards.*.hits, labels: [shard]}
  - {name: app_version, path: version}
  - {name: app_missing, path: nothing.here}
"""


@pytest.fixture
def stats_url() -> Iterator[str]:
    server = TinyHTTP(lambda _: (200, json.dumps(STATS).encode()))
    yield f"{server.url}/stats"
    server.close()


def test_json_stats_through_a_mapping(stats_url: str, tmp_path: Path) -> None:
    import yaml

    mapping = JSONMapping.model_validate(yaml.safe_load(MAPPING))
    got = scrape(Exporter(JSONSource(stats_url, mapping)))
    assert got["app_uptime_seconds", ()] == 42.5
    assert got["app_healthy", ()] == 1.0
    assert got["app_queue_depth", (("queue", "mail"),)] == 3
    assert got["app_queue_depth", (("queue", "sms"),)] == 0
    assert got["app_shard_hits_total", (("shard", "1"),)] == 20
    assert not any(k[0] in ("app_version", "app_missing") for k in got)  # text, absent


def test_the_command_serves_metrics_and_refuses_a_bad_mapping(
    stats_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("metrics:\n  - {name: x, path: a.*.b}\n")
    run = subprocess.run([*PODKIT, "adapter", "metrics", "--json", stats_url, "--mapping",
                          str(bad)], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "has 1 '*' but 0 labels" in run.stderr
    assert f"{bad}:1:1: metrics: " in run.stderr  # the list is checked whole
    bad.write_text("metrics:\n  - name: x\n   path: [\n")
    run = subprocess.run([*PODKIT, "adapter", "metrics", "--json", stats_url, "--mapping",
                          str(bad)], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and f"{bad}:3:4: invalid YAML: " in run.stderr
    good = tmp_path / "good.yaml"
    good.write_text(MAPPING)
    port = free_port()
    argv = ["adapter", "metrics", "--json", stats_url, "--mapping", str(good), "--port", str(port)]
    proc = subprocess.Popen([*PODKIT, *argv], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    assert r.headers["Content-Type"].startswith("text/plain")
                    got = values(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert got["app_queue_depth", (("queue", "mail"),)] == 3
        assert got["podkit_adapter_up", (("source", "json"),)] == 1.0
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_port_in_use_is_a_one_line_error() -> None:
    argv = ["adapter", "metrics", "--redis", "redis://127.0.0.1:1"]
    with port_in_use() as port:
        error = f"adapter: cannot listen on 127.0.0.1:{port} (--port): Address already in use"
        assert podkit_error([*argv, "--port", str(port)]) == (1, error)
