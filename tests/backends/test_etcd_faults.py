"""The etcd driver under faults: restarts and crashes of a private etcd, lost connections,
stopped keep-alives, compaction, nothing listening."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from podkit.backends import KV, BackendError, BackendUnavailable, Event, LeaseExpired, open_kv
from podkit.backends.etcd import EtcdKV
from servers import EtcdServer, find_free_port
from support import wait_for

# As the session fixture: etcd's minimum lease TTL becomes 1 s (2 s with its defaults).
FAST_LEASES = ["--heartbeat-interval=10", "--election-timeout=100"]


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A private etcd that a test may stop, kill and start again."""
    server = EtcdServer(extra_args=FAST_LEASES)
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
async def kv(etcd: EtcdServer) -> AsyncIterator[KV]:
    store = await open_kv(f"{etcd.url}?prefix=faults/")
    yield store
    await store.close()


async def _bounce(etcd: EtcdServer, how: str) -> None:
    """Stop etcd (SIGTERM, or SIGKILL as in a crash) and start it again, off the loop."""
    await asyncio.to_thread(etcd.kill if how == "crash" else etcd.stop)
    await asyncio.to_thread(etcd.start)


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_watch_resumes_after_etcd_restarts_without_gaps_or_repeats(
    etcd: EtcdServer, kv: KV, how: str
) -> None:
    seen: list[Event] = []

    async def follow() -> None:
        async for event in kv.watch("w/", prefix=True):
            seen.append(event)

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0.3)  # let the watch start
        written = [await kv.put(f"w/{i}", b"before") for i in range(5)]
        await wait_for(lambda: len(seen) == 5, 5, "events before the restart")

        await asyncio.to_thread(etcd.kill if how == "crash" else etcd.stop)
        during = asyncio.create_task(kv.put("w/during", b"down"))  # waits for etcd to return
        await asyncio.sleep(0.3)
        await asyncio.to_thread(etcd.start)
        written.append(await during)
        written += [await kv.put(f"w/{i}", b"after") for i in range(5)]
        assert await kv.delete("w/0")
        last = await kv.put("w/last", b"x")
        written += [last - 1, last]  # the delete, then the put

        await wait_for(lambda: len(seen) >= len(written), 10, "events after the restart")
        await asyncio.sleep(0.3)  # a repeated event would arrive now
        assert [e.revision for e in seen] == written
        assert [e.kind for e in seen] == ["put"] * 11 + ["delete", "put"]
        assert seen[5] == Event("put", "w/during", b"down", written[5])
    finally:
        task.cancel()


async def test_lease_expires_within_ttl_plus_1s_after_keep_alives_stop(
    etcd: EtcdServer, kv: KV
) -> None:
    lease = await kv.grant(1.0)
    await kv.put("holder", b"me", lease=lease)
    for _ in range(5):  # 1.5 s, past the TTL
        await asyncio.sleep(0.3)
        assert await kv.keep_alive(lease)
    await _bounce(etcd, "restart")  # etcd restores leases and renews them on restart
    for _ in range(3):
        assert await kv.keep_alive(lease)
        await asyncio.sleep(0.3)
    assert await kv.keep_alive(lease)
    stopped = time.monotonic()  # the holder goes quiet
    while await kv.get("holder") is not None:
        assert time.monotonic() - stopped < 2.0, "key outlived TTL + 1 s"
        await asyncio.sleep(0.05)
    assert not await kv.keep_alive(lease)
    with pytest.raises(LeaseExpired):
        await kv.put("holder", b"late", lease=lease)


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_acknowledged_writes_survive_and_the_client_keeps_working(
    etcd: EtcdServer, kv: KV, how: str
) -> None:
    for i in range(20):
        await kv.put(f"k/{i:02}", str(i).encode())
    lock = await kv.create("lock", b"owner")
    assert lock is not None
    before = await kv.range("")
    assert len(before) == 21

    await _bounce(etcd, how)

    assert await kv.range("") == before  # same values, same revisions
    moved = await kv.update("lock", b"owner2", revision=lock)  # same client, old fencing token
    assert moved is not None and moved > max(e.revision for e in before)
    assert await kv.create("lock", b"intruder") is None
    assert await kv.delete_if("lock", revision=moved)


async def test_requests_wait_for_a_restarting_etcd(etcd: EtcdServer, kv: KV) -> None:
    await kv.put("a", b"1")
    await asyncio.to_thread(etcd.stop)
    calls = asyncio.gather(kv.get("a"), kv.create("b", b"2"), kv.grant(5))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(etcd.start)
    got, created, lease = await calls
    assert got is not None and got.value == b"1"
    assert created is not None and lease > 0
    assert [e.key for e in await kv.range("")] == ["a", "b"]


async def test_a_stopped_etcd_fails_requests_after_the_timeout(etcd: EtcdServer) -> None:
    kv = await open_kv(etcd.url, timeout=0.5)
    try:
        await asyncio.to_thread(etcd.stop)
        start = time.monotonic()
        with pytest.raises(BackendUnavailable, match=rf"127\.0\.0\.1:{etcd.port} within 0\.5s"):
            await kv.get("x")
        assert time.monotonic() - start < 2.0
    finally:
        await kv.close()


async def test_watch_from_a_compacted_revision_fails_clearly(etcd: EtcdServer, kv: KV) -> None:
    first = await kv.put("c", b"1")
    latest = await kv.put("c", b"2")
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{etcd.http_url}/v3/kv/compaction", json={"revision": str(latest)}) as resp,
    ):
        assert resp.status == 200
    with pytest.raises(BackendError, match=f"revision {first} was compacted"):
        async for _ in kv.watch("c", start_revision=first):
            pass


async def test_open_with_nothing_listening_names_url_address_and_timeout() -> None:
    port = find_free_port()
    url = f"etcd://127.0.0.1:{port}?prefix=x/"
    with pytest.raises(BackendUnavailable) as info:
        await open_kv(url, timeout=0.5)
    message = str(info.value)
    assert url in message and f"no answer from 127.0.0.1:{port} within 0.5s" in message


async def test_only_repeatable_requests_are_retried_after_a_lost_connection() -> None:
    """A fake gateway drops the first request on each path after reading it."""
    hits: dict[str, int] = {}
    entry = {"key": "YQ==", "value": "MQ==", "mod_revision": "7", "create_revision": "7"}
    answers: dict[str, object] = {
        "/v3/maintenance/status": {"version": "3.4.23"},
        "/v3/kv/range": {"header": {"revision": "7"}, "kvs": [entry]},
        "/v3/kv/put": {"header": {"revision": "8"}},
    }

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        hits[request.path] = hits.get(request.path, 0) + 1
        if request.path != "/v3/maintenance/status" and hits[request.path] == 1:
            assert request.transport is not None
            request.transport.close()  # the request arrived; its answer is lost
        return web.json_response(answers[request.path])

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = find_free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    kv = await open_kv(f"etcd://127.0.0.1:{port}")
    try:
        got = await kv.get("a")  # a read is repeated
        assert got is not None and got.value == b"1" and hits["/v3/kv/range"] == 2
        with pytest.raises(BackendUnavailable, match="may or may not have happened"):
            await kv.put("a", b"2")  # a write is not: it may have been applied
        assert hits["/v3/kv/put"] == 1
        assert await kv.put("a", b"2") == 8
    finally:
        await kv.close()
        await runner.cleanup()


async def test_close_ends_open_watches(etcd: EtcdServer) -> None:
    kv = await open_kv(etcd.url)
    seen: list[Event] = []

    async def follow() -> None:
        async for event in kv.watch("x"):
            seen.append(event)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    await kv.put("x", b"1")
    await wait_for(lambda: len(seen) == 1, 5, "the first event")
    await kv.close()
    await asyncio.wait_for(task, 2)  # ends by itself, not by cancellation


async def test_a_quiet_watch_outlives_the_request_timeout_on_one_probed_connection(
    etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="podkit.backends.etcd")
    kv = await open_kv(etcd.url, timeout=0.5)
    assert isinstance(kv, EtcdKV)
    seen: list[Event] = []

    async def follow() -> None:
        async for event in kv.watch("q"):
            seen.append(event)

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(1.2)  # nothing happens for longer than a request may take
        (stream,) = kv._streams
        assert stream.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        revision = await kv.put("q", b"1")
        await wait_for(lambda: len(seen) == 1, 5, "the event")
        assert seen[0].revision == revision
        assert "lost" not in caplog.text  # the same stream all along
    finally:
        task.cancel()
        await kv.close()
