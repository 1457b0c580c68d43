"""The NATS JetStream driver under faults: server restarts, lease expiry, watch resumption.

Each test runs its own nats-server (JetStream, file storage) and restarts it on the same
port and data directory, with SIGTERM (`restart`) or SIGKILL (`crash`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from podkit.backends import BackendUnavailable, Event, open_kv, open_queue
from servers import NatsServer

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def nats(request: pytest.FixtureRequest) -> Iterator[NatsServer]:
    """A private nats-server; its dir is kept if the test failed."""
    server = NatsServer()
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


def bounce(server: NatsServer, how: str) -> None:
    """Restart the server: SIGTERM (`restart`) or SIGKILL (`crash`), then start it again."""
    if how == "crash":
        server.kill()
        server.start()
    else:
        server.restart()


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_acknowledged_writes_survive_a_restart(nats: NatsServer, how: str) -> None:
    url = f"{nats.url}?prefix=f"
    kv = await open_kv(url)
    queue = await open_queue(url, name="jobs")
    written: dict[str, tuple[bytes, int]] = {}
    enqueued: list[str] = []
    acked: list[str] = []
    unsure: list[str] = []  # operations cut off by the restart, outcome unknown (reported)
    done = asyncio.Event()

    async def write_keys() -> None:
        i = 0
        while not done.is_set():
            value = f"value {i}".encode()
            written[f"key/{i}"] = (value, await kv.put(f"key/{i}", value))
            i += 1

    async def enqueue_and_ack() -> None:
        i = 0
        while not done.is_set():
            try:
                enqueued.extend(await queue.enqueue_batch([f"{i}.{j}".encode() for j in range(10)]))
            except BackendUnavailable as exc:  # keyless: may or may not have been enqueued
                assert "may or may not" in str(exc)
                unsure.append(str(exc))
            batch = await queue.dequeue(6, visibility=60)
            await queue.ack(batch)
            acked.extend(m.id for m in batch)
            i += 1

    workers = [asyncio.create_task(write_keys()), asyncio.create_task(enqueue_and_ack())]
    await asyncio.sleep(0.3)
    before = (len(written), len(enqueued))
    await asyncio.to_thread(bounce, nats, how)
    during = (len(written), len(enqueued))
    await asyncio.sleep(1.5)
    done.set()
    await asyncio.gather(*workers)  # the same objects kept working through the restart
    assert len(written) > during[0] >= before[0] > 0
    assert len(enqueued) > during[1] >= before[1] > 0

    # every acknowledged KV write is there with its revision; revisions kept rising
    revisions = [rev for _, rev in written.values()]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    for key, (value, rev) in written.items():
        entry = await kv.get(key)
        assert entry is not None, f"{key} lost"
        assert (entry.value, entry.revision) == (value, rev)
    assert len(await kv.range("key/")) == len(written)

    # every enqueued item is there unless acked (after a restart no acked item comes back;
    # after a crash some may: nats-server 2.9 persists consumer acks lazily)
    assert len(set(enqueued)) == len(enqueued) and set(acked) <= set(enqueued)
    left: list[str] = []
    while batch := await queue.dequeue(100, visibility=60):
        left += [m.id for m in batch]
        await queue.ack(batch)
    assert set(enqueued) - set(acked) <= set(left)
    assert len(set(left) - set(enqueued)) <= 10 * len(unsure)
    if how == "restart":
        assert not set(left) & set(acked)
        assert await queue.stats() == type(await queue.stats())(0, 0, 0)
    else:
        print(
            f"after the crash {len(set(left) & set(acked))} of {len(acked)} acked items came back"
        )
        assert (await queue.stats()).depth == 0
    await kv.close()
    await queue.close()


async def test_a_lease_expires_after_its_holder_stops(nats: NatsServer) -> None:
    url = f"{nats.url}?prefix=l"
    holder, observer = await open_kv(url), await open_kv(url)
    events: list[tuple[float, Event]] = []

    async def watch() -> None:
        async for event in observer.watch("members/", prefix=True):
            events.append((time.monotonic(), event))

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    lease = await holder.grant(1.0)
    rev = await holder.put("members/a", b"up", lease=lease)
    for _ in range(4):  # alive well past one TTL
        await asyncio.sleep(0.4)
        assert await holder.keep_alive(lease)
    last_renewal = time.monotonic()
    await holder.close()  # the holder is gone: no more keep-alives
    while not any(e.kind == "delete" for _, e in events):
        assert time.monotonic() - last_renewal < 2.0 + 0.5, "lease outlived TTL + 1 s"
        await asyncio.sleep(0.05)
    (deleted_at, deleted) = next((t, e) for t, e in events if e.kind == "delete")
    assert deleted_at - last_renewal <= 1.0 + 1.0
    assert [(e.kind, e.key) for _, e in events] == [("put", "members/a"), ("delete", "members/a")]
    assert events[0][1].revision == rev < deleted.revision
    assert await observer.get("members/a") is None
    assert not await observer.keep_alive(lease)
    watcher.cancel()
    await observer.close()


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_a_watch_resumes_after_a_restart(nats: NatsServer, how: str) -> None:
    url = f"{nats.url}?prefix=w"
    writer, reader = await open_kv(url), await open_kv(url)
    puts: list[tuple[int, str, bytes]] = []
    events: list[Event] = []
    done, caught_up = asyncio.Event(), asyncio.Event()

    async def watch() -> None:
        async for event in reader.watch("cfg/", prefix=True):
            events.append(event)
            if done.is_set() and len(events) >= len(puts):
                caught_up.set()

    async def write() -> None:
        i = 0
        while not done.is_set():
            key, value = f"cfg/{i % 7}", f"v{i}".encode()
            puts.append((await writer.put(key, value), key, value))
            i += 1
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    writes = asyncio.create_task(write())
    await asyncio.sleep(0.3)
    seen_before = len(events)
    await asyncio.to_thread(bounce, nats, how)
    await asyncio.sleep(0.5)
    done.set()
    await writes
    if len(events) >= len(puts):
        caught_up.set()
    await asyncio.wait_for(caught_up.wait(), 10)
    watcher.cancel()
    assert 0 < seen_before < len(puts)
    assert [(e.revision, e.key, e.value) for e in events] == puts  # none missed or repeated
    await writer.close()
    await reader.close()
