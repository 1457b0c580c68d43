"""NATS driver specifics the contract suite does not reach: key escaping, prefixes,
delayed items, per-member ack_wait, receipts after an ack."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from podkit.backends import StaleReceipt, open_kv, open_queue, open_topic
from servers import NatsServer

ODD_KEYS = ["a.b", "a*", "a>", "sp ace", "", "x//y", "x/", "ünï/cødé", "u_s-d", "-", "-2D", "/"]


@pytest.fixture
def url(nats_server: NatsServer) -> str:
    return f"{nats_server.url}?prefix=d{uuid.uuid4().hex[:8]}"


async def test_any_key_round_trips_and_ranges(url: str) -> None:
    kv = await open_kv(url)
    for key in ODD_KEYS:
        await kv.put(key, key.encode())
    for key in ODD_KEYS:
        entry = await kv.get(key)
        assert entry is not None and entry.value == key.encode(), key
    for prefix in ["", "a", "x/", "x", "-", "ü", "/"]:
        got = [e.key for e in await kv.range(prefix)]
        assert got == sorted(k for k in ODD_KEYS if k.startswith(prefix)), prefix
    await kv.close()


async def test_prefixes_do_not_see_each_other(nats_server: NatsServer) -> None:
    a = await open_kv(f"{nats_server.url}?prefix=iso-a")
    b = await open_kv(f"{nats_server.url}?prefix=iso-b")
    await a.put("k", b"a")
    assert await b.get("k") is None and await b.range("") == []
    await a.close()
    await b.close()


async def test_delayed_item_waits_and_counts_as_depth(url: str) -> None:
    queue = await open_queue(url, name="later")
    start = time.monotonic()
    await queue.enqueue(b"soon", delay=0.6)
    assert await queue.dequeue() == []  # fetched early, handed back: not an attempt
    assert (await queue.stats()).depth == 1
    (msg,) = await queue.dequeue(wait=3)
    assert time.monotonic() - start >= 0.5
    assert (msg.payload, msg.attempts) == (b"soon", 1)
    await queue.ack([msg])
    assert await queue.stats() == type(await queue.stats())(0, 0, 0)
    await queue.close()


async def test_receipts_are_stale_once_acked(url: str) -> None:
    queue = await open_queue(url, name="done")
    await queue.enqueue(b"x")
    (msg,) = await queue.dequeue()
    await queue.ack([msg])
    with pytest.raises(StaleReceipt):
        await queue.extend(msg, 5)
    with pytest.raises(StaleReceipt):
        await queue.nack(msg)
    await queue.ack([msg])  # ignored
    await queue.close()


async def test_a_member_keeps_its_own_ack_wait(url: str) -> None:
    topic = await open_topic(url, name="t")
    slow = await topic.subscribe("g", ack_wait=30)  # creates the group
    quick = await topic.subscribe("g", ack_wait=0.3)
    await topic.publish(b"x")
    (first,) = await quick.fetch(1, wait=1)  # not acked: back after 0.3 s, not 30 s
    await asyncio.sleep(0.5)
    again = await slow.fetch(1, wait=2)
    assert [r.position for r in again] == [first.position]
    await slow.ack(again)
    await topic.close()
