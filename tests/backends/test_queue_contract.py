"""The Queue contract, run against every driver on its real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from podkit.backends import Queue, StaleReceipt, open_queue


@pytest.fixture
async def queue(queue_url: str) -> AsyncIterator[Queue]:
    q = await open_queue(queue_url, name="jobs", max_attempts=3)
    yield q
    await q.close()


async def test_enqueue_dequeue_ack_in_order(queue: Queue) -> None:
    ids = [await queue.enqueue(f"item {i}".encode()) for i in range(5)]
    assert len(set(ids)) == 5
    got = await queue.dequeue(10, visibility=30)
    assert [m.payload for m in got] == [f"item {i}".encode() for i in range(5)]
    assert [m.id for m in got] == ids
    assert all(m.attempts == 1 for m in got)
    stats = await queue.stats()
    assert (stats.depth, stats.in_flight, stats.dead) == (0, 5, 0)
    await queue.ack(got)
    stats = await queue.stats()
    assert (stats.depth, stats.in_flight, stats.dead) == (0, 0, 0)
    assert await queue.dequeue(10) == []


async def test_batch_enqueue_and_dequeue(queue: Queue) -> None:
    payloads = [str(i).encode() for i in range(250)]
    ids = await queue.enqueue_batch(payloads)
    assert len(ids) == 250 and len(set(ids)) == 250
    assert (await queue.stats()).depth == 250
    seen: list[bytes] = []
    while True:
        batch = await queue.dequeue(100)
        if not batch:
            break
        assert len(batch) <= 100
        seen += [m.payload for m in batch]
        await queue.ack(batch)
    assert sorted(seen) == sorted(payloads)
    assert (await queue.stats()).depth == 0


async def test_dequeue_acks_what_it_carries_then_takes(queue: Queue) -> None:
    assert isinstance(queue.dequeue_acks, bool)
    await queue.enqueue_batch([b"a", b"b", b"c"])
    first = await queue.dequeue(2, visibility=30)
    assert [m.payload for m in first] == [b"a", b"b"]
    (third,) = await queue.dequeue(2, visibility=30, ack=first)
    assert third.payload == b"c"
    assert await queue.stats() == type(await queue.stats())(0, 1, 0)
    assert await queue.dequeue(2, ack=[third, *first]) == []  # acks with nothing to take
    assert await queue.stats() == type(await queue.stats())(0, 0, 0)


async def test_dequeue_ignores_a_stale_receipt_it_carries(queue: Queue) -> None:
    await queue.enqueue(b"slow")
    (first,) = await queue.dequeue(visibility=0.5)
    await asyncio.sleep(0.7)
    (second,) = await queue.dequeue(visibility=30)
    assert second.id == first.id and second.attempts == 2
    assert await queue.dequeue(ack=[first]) == []  # stale: the current delivery stays
    assert (await queue.stats()).in_flight == 1
    assert await queue.dequeue(ack=[second]) == []
    assert await queue.stats() == type(await queue.stats())(0, 0, 0)


async def test_idempotency_key_dedupes(queue: Queue) -> None:
    first = await queue.enqueue(b"charge order 7", key="order-7")
    again = await queue.enqueue(b"charge order 7 (retry)", key="order-7")
    other = await queue.enqueue(b"charge order 8", key="order-8")
    assert again == first and other != first
    ids = await queue.enqueue_batch([b"x", b"y"], keys=["order-7", "order-9"])
    assert ids[0] == first
    got = await queue.dequeue(10)
    assert sorted(m.payload for m in got) == [b"charge order 7", b"charge order 8", b"y"]


async def test_visibility_timeout_redelivers(queue: Queue) -> None:
    await queue.enqueue(b"slow")
    (first,) = await queue.dequeue(visibility=0.5)
    assert await queue.dequeue() == []  # hidden while in flight
    await asyncio.sleep(0.7)
    (second,) = await queue.dequeue(visibility=30)
    assert second.id == first.id and second.attempts == 2
    with pytest.raises(StaleReceipt):
        await queue.extend(first, 10)
    with pytest.raises(StaleReceipt):
        await queue.nack(first)
    await queue.ack([first])  # stale: ignored, the current delivery stays
    assert (await queue.stats()).in_flight == 1
    await queue.ack([second])
    assert await queue.stats() == type(await queue.stats())(0, 0, 0)


async def test_extend_keeps_an_item_hidden(queue: Queue) -> None:
    await queue.enqueue(b"long")
    (msg,) = await queue.dequeue(visibility=0.5)
    for _ in range(4):  # 1.2 s, past the first visibility
        await asyncio.sleep(0.3)
        await queue.extend(msg, 0.6)
        assert await queue.dequeue() == []
    await queue.ack([msg])


async def test_nack_with_delay_then_dead_letter(queue: Queue) -> None:
    await queue.enqueue(b"poison")
    (m1,) = await queue.dequeue()
    await queue.nack(m1, delay=0.4, error="boom 1")
    assert await queue.dequeue() == []
    assert (await queue.stats()).depth == 1
    start = time.monotonic()
    (m2,) = await queue.dequeue(wait=3)
    assert time.monotonic() - start >= 0.2
    assert m2.attempts == 2 and m2.last_error == "boom 1"
    await queue.nack(m2, error="boom 2")
    (m3,) = await queue.dequeue(wait=2)
    assert m3.attempts == 3
    await queue.nack(m3, error="boom 3")  # third delivery of max_attempts=3: dead
    assert await queue.dequeue(wait=0.3) == []
    stats = await queue.stats()
    assert (stats.depth, stats.in_flight, stats.dead) == (0, 0, 1)
    (dead,) = await queue.dead_letters()
    assert (dead.id, dead.payload, dead.attempts, dead.last_error) == (
        m1.id,
        b"poison",
        3,
        "boom 3",
    )


async def test_expired_visibility_counts_toward_dead_letter(queue: Queue) -> None:
    await queue.enqueue(b"crashes its worker")
    for _ in range(3):
        (m,) = await queue.dequeue(visibility=0.2, wait=2)
        await asyncio.sleep(0.3)
    assert await queue.dequeue(wait=0.3) == []
    (dead,) = await queue.dead_letters()
    assert dead.id == m.id and dead.attempts == 3


async def test_dequeue_waits_for_an_item(queue: Queue) -> None:
    async def produce() -> None:
        await asyncio.sleep(0.3)
        await queue.enqueue(b"late")

    task = asyncio.create_task(produce())
    start = time.monotonic()
    got = await queue.dequeue(wait=3)
    await task
    assert [m.payload for m in got] == [b"late"]
    assert time.monotonic() - start < 2.0


async def test_competing_consumers_share_without_duplicates(queue: Queue) -> None:
    await queue.enqueue_batch([str(i).encode() for i in range(200)])
    seen: list[bytes] = []

    async def worker() -> None:
        while batch := await queue.dequeue(7, wait=0.2):
            seen.extend(m.payload for m in batch)
            await queue.ack(batch)

    await asyncio.gather(*(worker() for _ in range(4)))
    assert sorted(seen) == sorted(str(i).encode() for i in range(200))


async def test_two_prefixes_on_one_store_are_two_queues(queue_url: str) -> None:
    sep = "&" if "?" in queue_url else "?"
    a = await open_queue(f"{queue_url}{sep}prefix=pa", name="jobs")
    b = await open_queue(f"{queue_url}{sep}prefix=pb", name="jobs")
    try:
        await a.enqueue(b"for a")
        assert await b.dequeue(10) == []
        (got,) = await a.dequeue(10, visibility=30)
        assert got.payload == b"for a"
        await a.ack([got])
    finally:
        await a.close()
        await b.close()
