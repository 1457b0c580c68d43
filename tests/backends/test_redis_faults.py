"""The Redis driver under faults: server restarts and crashes, lease expiry, watch resumption.

Each test runs its own redis-server with `appendonly yes` and `appendfsync always`, so
every write the server acknowledged is on disk before the reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from podkit.backends import KV, BackendUnavailable, Event, open_kv, open_queue, open_topic
from servers import RedisServer, find_free_port

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def durable_redis(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A private Redis with AOF fsynced on every write; its dir is kept if the test failed."""
    server = RedisServer(appendonly=True, extra_args=["--appendfsync", "always"])
    failed_before = request.session.testsfailed
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed == failed_before:
            server.remove()
        else:
            print(f"kept {server.dir}\n{server.log_tail(12)}")


def bounce(server: RedisServer, how: str, down: float = 0.3) -> float:
    """Stop the server by SIGTERM (`restart`) or SIGKILL (`crash`), keep it down for `down`
    seconds, start it again; return when it began to start (it was down until then)."""
    if how == "crash":
        server.kill()
    else:
        server.stop()
    time.sleep(down)
    starting = time.monotonic()
    server.start()
    return starting


@pytest.fixture
async def kv(durable_redis: RedisServer) -> AsyncIterator[KV]:
    store = await open_kv(f"{durable_redis.url}?prefix=f:")
    yield store
    await store.close()


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_acknowledged_writes_survive_a_restart(
    durable_redis: RedisServer, kv: KV, how: str
) -> None:
    queue = await open_queue(f"{durable_redis.url}?prefix=f:", name="jobs")
    written: dict[str, tuple[bytes, int]] = {}
    enqueued: list[str] = []
    acked: list[str] = []
    spans: dict[str, list[tuple[float, float]]] = {"kv": [], "queue": []}
    done = asyncio.Event()

    async def write_keys() -> None:
        i = 0
        while not done.is_set():
            value, start = f"value {i}".encode(), time.monotonic()
            written[f"key/{i}"] = (value, await kv.put(f"key/{i}", value))
            spans["kv"].append((start, time.monotonic()))
            i += 1

    async def enqueue_and_ack() -> None:
        i = 0
        while not done.is_set():
            start = time.monotonic()
            enqueued.extend(await queue.enqueue_batch([f"{i}.{j}".encode() for j in range(10)]))
            batch = await queue.dequeue(6, visibility=60)
            await queue.ack(batch)
            acked.extend(m.id for m in batch)
            spans["queue"].append((start, time.monotonic()))
            i += 1

    workers = [asyncio.create_task(write_keys()), asyncio.create_task(enqueue_and_ack())]
    await asyncio.sleep(0.3)
    before = (len(written), len(enqueued))
    starting = await asyncio.to_thread(bounce, durable_redis, how)
    await asyncio.sleep(0.3)
    done.set()
    await asyncio.gather(*workers)  # no worker saw an error
    assert len(written) > before[0] > 0 and len(enqueued) > before[1] > 0
    for what, runs in spans.items():  # calls made while the server was down waited for it
        assert any(s < starting - 0.1 and e > starting for s, e in runs), what

    # every acknowledged KV write is there, with its revision, and revisions kept rising
    revisions = [rev for _, rev in written.values()]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    for key, (value, rev) in written.items():
        entry = await kv.get(key)
        assert entry is not None, f"{key} lost"
        assert (entry.value, entry.revision) == (value, rev)
    assert len(await kv.range("key/")) == len(written)

    # every enqueued item is there unless acked; no acked item comes back
    assert len(set(enqueued)) == len(enqueued) and set(acked) <= set(enqueued)
    stats = await queue.stats()
    assert (stats.depth, stats.in_flight, stats.dead) == (len(enqueued) - len(acked), 0, 0)
    left: list[str] = []
    while batch := await queue.dequeue(100):
        left += [m.id for m in batch]
        await queue.ack(batch)
    assert sorted(left) == sorted(set(enqueued) - set(acked))
    await queue.close()


async def test_lease_expires_within_a_second_of_its_ttl(durable_redis: RedisServer) -> None:
    url = f"{durable_redis.url}?prefix=f:"
    holder = await open_kv(url)
    observer = await open_kv(url)
    lease = await holder.grant(1.0)
    rev = await holder.put("leader", b"me", lease=lease)
    events: list[tuple[Event, float]] = []

    async def watch() -> None:
        async for ev in observer.watch("leader", start_revision=rev):
            events.append((ev, time.monotonic()))
            if ev.kind == "delete":
                return

    watcher = asyncio.create_task(watch())
    for _ in range(5):  # 1.5 s of keep-alives, past the TTL
        await asyncio.sleep(0.3)
        assert await holder.keep_alive(lease)
    stopped = time.monotonic()
    await holder.close()  # the holder is gone: only the observer's watch sweeps
    await asyncio.wait_for(watcher, 5)
    (put, _), (delete, seen_at) = events
    assert (put.kind, put.revision, delete.kind) == ("put", rev, "delete")
    assert 0.8 <= seen_at - stopped <= 2.0, f"deleted {seen_at - stopped:.2f}s after keep-alive"
    assert await observer.get("leader") is None
    assert not await observer.keep_alive(lease)
    await observer.close()


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_watch_resumes_after_a_restart(durable_redis: RedisServer, kv: KV, how: str) -> None:
    watcher = await open_kv(f"{durable_redis.url}?prefix=f:")
    events: list[Event] = []
    expected: list[tuple[str, str, int]] = []

    async def collect(n: int) -> None:
        async for ev in watcher.watch("w/", prefix=True):
            events.append(ev)
            if len(events) == n:
                return

    async def write(i: int) -> None:
        expected.append(("put", f"w/{i}", await kv.put(f"w/{i}", str(i).encode())))
        other = await kv.put(f"other/{i}", b"not watched")
        if i % 3 == 0:
            assert await kv.delete(f"w/{i}")
            expected.append(("delete", f"w/{i}", other + 1))  # the only writer here

    task = asyncio.create_task(collect(40))
    await asyncio.sleep(0.3)  # the watch is running
    for i in range(10):
        await write(i)
    bouncing = asyncio.create_task(asyncio.to_thread(bounce, durable_redis, how))
    i = 10
    while not bouncing.done():  # writes while the server goes down and comes back
        await write(i)
        i += 1
        await asyncio.sleep(0.01)
    await bouncing
    while len(expected) < 40:
        await write(i)
        i += 1
    await asyncio.wait_for(task, 15)
    assert [(e.kind, e.key, e.revision) for e in events] == expected[:40]
    await watcher.close()


async def test_nothing_listening_names_url_address_and_timeout() -> None:
    port = find_free_port()
    url = f"redis://app:s3cret@127.0.0.1:{port}/0?prefix=x:"
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        await open_kv(url, timeout=0.5)
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "0.5s" in message
    assert "redis://app:***@" in message and "s3cret" not in message


class LossyProxy:
    """A TCP proxy to Redis that, when armed, forwards the next EVALSHA but drops its
    reply and closes the connection: the server applied the write, the client never
    heard back."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.armed = False
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await asyncio.wait_for(asyncio.gather(*self._conns), 5)  # clients closed theirs

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        doomed = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.armed and b"EVALSHA" in data:
                    self.armed = False
                    doomed.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if doomed.is_set():
                    self.dropped += 1
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            client_w.close()
            server_w.close()


async def test_a_lost_reply_is_retried_without_acting_twice(durable_redis: RedisServer) -> None:
    proxy = LossyProxy(durable_redis.port)
    await proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}/0?prefix=lost:"
    kv = await open_kv(url)
    queue = await open_queue(url, name="jobs", max_attempts=3)
    topic = await open_topic(url, name="events")
    # load every script once, so that no armed call meets NOSCRIPT
    r0 = await kv.put("warm", b"")
    await kv.create("warm2", b"")
    await kv.delete("warm2")
    await queue.enqueue(b"warm")
    (warm,) = await queue.dequeue(1)
    await queue.nack(warm)
    await queue.ack(await queue.dequeue(1))
    await topic.publish(b"warm")

    proxy.armed = True
    r1 = await kv.create("lock", b"mine")
    assert r1 is not None, "a retried create must report its own win"
    assert await kv.put("next", b"") == r1 + 1, "the retried create took a second revision"
    proxy.armed = True
    assert await kv.delete("lock"), "a retried delete must report its own delete"
    proxy.armed = True
    ids = await queue.enqueue_batch([b"a", b"b", b"c"])
    assert (await queue.stats()).depth == 3 and len(set(ids)) == 3
    proxy.armed = True
    got = await queue.dequeue(3)
    assert [m.id for m in got] == ids and all(m.attempts == 1 for m in got)
    assert await queue.stats() == type(await queue.stats())(0, 3, 0)
    proxy.armed = True
    await queue.nack(got[0], error="retry me")  # no StaleReceipt from the retry
    assert await queue.stats() == type(await queue.stats())(1, 2, 0)
    proxy.armed = True
    position = await topic.publish(b"once")
    assert [r.payload for r in await topic.read(position, 10)] == [b"once"]
    assert proxy.dropped == 6 and r0 < r1
    for closing in (kv, queue, topic):
        await closing.close()
    await proxy.close()
