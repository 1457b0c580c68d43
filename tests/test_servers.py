"""Smoke tests: the test servers are real, reachable, and durable across restarts."""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import redis
from nats.js.api import StreamConfig

from servers import EtcdServer, NatsServer, RedisServer, ServerError, require_binary


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_redis_set_get(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    try:
        assert r.config_get("port") == {"port": str(redis_server.port)}
        key = f"smoke:{uuid.uuid4().hex}"
        assert r.set(key, "v1") is True
        assert r.get(key) == b"v1"
    finally:
        r.close()


async def _publish(url: str, stream: str, payloads: list[bytes]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
        for i, data in enumerate(payloads, 1):
            ack = await js.publish(f"{stream}.x", data)
            assert (ack.stream, ack.seq) == (stream, i)
    finally:
        await nc.close()


async def _consume(url: str, stream: str, count: int) -> list[bytes]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        assert (await js.stream_info(stream)).state.messages == count
        sub = await js.pull_subscribe(f"{stream}.>", durable="smoke")
        msgs = await sub.fetch(count, timeout=5)
        for m in msgs:
            await m.ack()
        return [m.data for m in msgs]
    finally:
        await nc.close()


async def test_nats_jetstream(nats_server: NatsServer) -> None:
    stream = f"S{uuid.uuid4().hex[:8]}"
    await _publish(nats_server.url, stream, [b"hello"])
    assert await _consume(nats_server.url, stream, 1) == [b"hello"]


async def _etcd(session: aiohttp.ClientSession, url: str, op: str, **body: str) -> Any:
    async with session.post(f"{url}/v3/kv/{op}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_etcd_put_range(etcd_server: EtcdServer) -> None:
    key = f"smoke/{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as s:
        put = await _etcd(s, etcd_server.http_url, "put", key=_b64(key), value=_b64("v1"))
        got = await _etcd(s, etcd_server.http_url, "range", key=_b64(key))
    assert int(got["header"]["revision"]) >= int(put["header"]["revision"]) > 0
    assert [base64.b64decode(kv["value"]) for kv in got["kvs"]] == [b"v1"]


def test_redis_restart_keeps_data_with_aof(fresh_redis: RedisServer) -> None:
    url, pid = fresh_redis.url, fresh_redis.pid
    with redis.Redis.from_url(url) as r:
        r.set("k", "v1")
    fresh_redis.restart()
    assert fresh_redis.pid != pid and fresh_redis.url == url
    with redis.Redis.from_url(url) as r:
        assert r.get("k") == b"v1"


def test_redis_restart_loses_data_without_aof() -> None:
    with RedisServer(appendonly=False) as server, redis.Redis.from_url(server.url) as r:
        r.set("k", "v1")
        server.restart()
        assert r.get("k") is None  # the client reconnects to a new, empty server


async def test_nats_restart_keeps_jetstream_messages() -> None:
    with NatsServer() as server:
        await _publish(server.url, "DURABLE", [b"a", b"b", b"c"])
        port = server.port
        server.restart()
        assert server.port == port
        assert await _consume(server.url, "DURABLE", 3) == [b"a", b"b", b"c"]


async def test_etcd_session_server_survives_restart(etcd_server: EtcdServer) -> None:
    async with aiohttp.ClientSession() as s:
        await _etcd(s, etcd_server.http_url, "put", key=_b64("durable"), value=_b64("v1"))
    etcd_server.restart()
    async with aiohttp.ClientSession() as s:
        got = await _etcd(s, etcd_server.http_url, "range", key=_b64("durable"))
    assert base64.b64decode(got["kvs"][0]["value"]) == b"v1"


def test_start_failure_shows_log_tail() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "x"])
    try:
        with pytest.raises(ServerError, match="no-such-directive"):
            server.start()
        assert not server.running
    finally:
        server.remove()


def test_require_binary_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PODKIT_REQUIRE_SERVERS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install pkg-x"):
        require_binary("podkit-no-such-binary", "pkg-x")
    monkeypatch.setenv("PODKIT_REQUIRE_SERVERS", "1")  # make test: it installed them first
    with pytest.raises(pytest.fail.Exception, match="apt-get install pkg-x"):
        require_binary("podkit-no-such-binary", "pkg-x")
    monkeypatch.delenv("PODKIT_REQUIRE_SERVERS")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install pkg-x"):
        require_binary("podkit-no-such-binary", "pkg-x")


def test_setup_servers_names_what_is_missing_and_how_to_install_it(tmp_path: Path) -> None:
    """Where it may not install (here: asked only to check, with a PATH that holds no
    server), the set-up names each missing package and the command, and exits 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "python3", "env"):  # what the script itself runs on
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    script = Path(__file__).parent.parent / "tools" / "setup-servers"
    run = subprocess.run(
        [str(bin_dir / "bash"), str(script), "--check"],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "SETUP_SYSTEM_PATH": ""},
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    first, second, _ = run.stderr.splitlines()
    assert first.startswith("setup-servers: missing: ")
    for pkg in ("redis-server", "nats-server", "etcd-server", "nginx", "wrk"):
        assert pkg in first.split()
    assert second.startswith("  install them with: sudo apt-get install -y")
