"""Redis driver specifics beyond the contract: delivery groups, batch sizes, namespacing,
dedupe windows and a trimmed changelog."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from podkit.backends import BackendError, open_kv, open_queue, open_topic
from servers import RedisServer


def url_for(server: RedisServer) -> tuple[str, str]:
    prefix = f"d{uuid.uuid4().hex[:8]}:"
    return f"{server.url}?prefix={prefix}", prefix


async def test_one_delivery_of_a_batch_extended_acked_or_expired(
    redis_server: RedisServer,
) -> None:
    url, _ = url_for(redis_server)
    queue = await open_queue(url, name="jobs", max_attempts=3)
    await queue.enqueue_batch([b"kept", b"done", b"lost"])
    kept, done, lost = await queue.dequeue(3, visibility=0.4)
    await queue.extend(kept, 5)
    await queue.ack([done])
    await asyncio.sleep(0.5)
    stats = await queue.stats()
    assert (stats.depth, stats.in_flight, stats.dead) == (1, 1, 0)
    (again,) = await queue.dequeue(3, visibility=30)
    assert (again.id, again.attempts) == (lost.id, 2)
    await queue.extend(kept, 5)  # extending again keeps its own deadline moving
    await queue.ack([kept, lost])  # lost's old receipt is stale: ignored
    assert (await queue.stats()).in_flight == 1
    await queue.ack([again])
    assert await queue.stats() == type(stats)(0, 0, 0)
    await queue.close()


async def test_batches_larger_than_a_lua_unpack(redis_server: RedisServer) -> None:
    url, _ = url_for(redis_server)
    queue = await open_queue(url, name="big")
    payloads = [i.to_bytes(4, "big") for i in range(10_000)]
    ids = await queue.enqueue_batch(payloads)
    assert len(set(ids)) == 10_000
    got = await queue.dequeue(10_000)
    assert [m.payload for m in got] == payloads
    await queue.ack(got)
    assert await queue.stats() == type(await queue.stats())(0, 0, 0)
    await queue.close()


async def test_every_key_is_under_the_prefix(redis_server: RedisServer) -> None:
    url, prefix = url_for(redis_server)
    other_url, _ = url_for(redis_server)
    kv = await open_kv(url)
    lease = await kv.grant(30)
    await kv.put("a", b"1", lease=lease)
    queue = await open_queue(url, name="q")
    await queue.enqueue(b"x", key="k", delay=5)
    await queue.enqueue(b"y")
    await queue.nack((await queue.dequeue())[0], error="e")
    topic = await open_topic(url, name="t")
    sub = await topic.subscribe("g")
    await topic.publish(b"p")
    await sub.fetch(1)
    other = await open_kv(other_url)
    assert await other.get("a") is None and await other.range("") == []
    client = Redis(host=redis_server.host, port=redis_server.port)
    keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}*")]
    assert len(keys) > 10
    tags = {k.split(":")[1] for k in keys}
    assert tags == {"kv", "q", "t"}
    await client.aclose()
    for closing in (kv, queue, topic, other):
        await closing.close()


async def test_an_idempotency_key_is_forgotten_after_the_window(
    redis_server: RedisServer,
) -> None:
    url, _ = url_for(redis_server)
    queue = await open_queue(url, name="jobs", dedupe_window=0.3)
    first = await queue.enqueue(b"1", key="order")
    assert await queue.enqueue(b"2", key="order") == first
    await asyncio.sleep(0.4)
    assert await queue.enqueue(b"3", key="order") != first
    assert [m.payload for m in await queue.dequeue(10)] == [b"1", b"3"]
    await queue.close()


async def test_a_watch_from_a_trimmed_revision_fails_loudly(redis_server: RedisServer) -> None:
    url, _ = url_for(redis_server)
    kv = await open_kv(url, history=10)
    first = await kv.put("k", b"0")
    for i in range(500):  # MAXLEN ~ trims whole stream nodes (100 entries by default)
        await kv.put("k", str(i).encode())
    with pytest.raises(BackendError, match="trimmed"):
        async for _ in kv.watch("k", start_revision=first):
            pass
    await kv.close()
