"""The Topic contract, run against every driver on its real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from podkit.backends import Record, Subscription, Topic, open_topic


@pytest.fixture
async def topic(topic_url: str) -> AsyncIterator[Topic]:
    t = await open_topic(topic_url, name="events")
    yield t
    await t.close()


async def drain(sub: Subscription, wait: float = 0.3) -> list[Record]:
    out: list[Record] = []
    while batch := await sub.fetch(50, wait=wait):
        out += batch
        await sub.ack(batch)
    return out


async def test_positions_increase(topic: Topic) -> None:
    p1 = await topic.publish(b"a")
    ps = await topic.publish_batch([b"b", b"c"])
    assert p1 < ps[0] < ps[1]
    got = await topic.read(p1, 10)
    expected = list(zip([p1, *ps], [b"a", b"b", b"c"], strict=True))
    assert [(r.position, r.payload) for r in got] == expected
    assert [r.payload for r in await topic.read(ps[0], 1)] == [b"b"]


async def test_every_group_gets_every_record(topic: Topic) -> None:
    billing = await topic.subscribe("billing")
    audit = await topic.subscribe("audit")
    await topic.publish_batch([f"e{i}".encode() for i in range(20)])
    for sub in (billing, audit):
        got = await drain(sub)
        assert [r.payload for r in got] == [f"e{i}".encode() for i in range(20)]


async def test_members_of_a_group_split_the_records(topic: Topic) -> None:
    a = await topic.subscribe("workers")
    b = await topic.subscribe("workers")
    await topic.publish_batch([str(i).encode() for i in range(60)])
    got_a: list[Record] = []
    got_b: list[Record] = []

    async def run(sub: Subscription, out: list[Record]) -> None:
        while batch := await sub.fetch(5, wait=0.5):
            out += batch
            await sub.ack(batch)
            await asyncio.sleep(0.01)

    await asyncio.gather(run(a, got_a), run(b, got_b))
    positions = [r.position for r in got_a + got_b]
    assert len(positions) == 60 and len(set(positions)) == 60
    assert got_a and got_b


async def test_unacked_records_come_back(topic: Topic) -> None:
    sub = await topic.subscribe("g", ack_wait=0.5)
    await topic.publish(b"x")
    (first,) = await sub.fetch(10, wait=1)
    assert await sub.fetch(10, wait=0.2) == []
    await asyncio.sleep(0.6)
    again = await sub.fetch(10, wait=2)
    assert [r.position for r in again] == [first.position]
    await sub.ack(again)
    assert await sub.fetch(10, wait=0.7) == []


async def test_group_position_is_durable(topic_url: str) -> None:
    t1 = await open_topic(topic_url, name="log")
    sub = await t1.subscribe("reader")
    await t1.publish_batch([b"1", b"2", b"3"])
    batch = await sub.fetch(2, wait=1)
    assert [r.payload for r in batch] == [b"1", b"2"]
    await sub.ack(batch)
    await sub.close()
    await t1.close()
    t2 = await open_topic(topic_url, name="log")
    sub2 = await t2.subscribe("reader")
    await t2.publish(b"4")
    assert [r.payload for r in await drain(sub2)] == [b"3", b"4"]
    await t2.close()


async def test_start_latest_and_at_position(topic: Topic) -> None:
    await topic.publish_batch([b"old1", b"old2"])
    p3 = await topic.publish(b"old3")
    late = await topic.subscribe("late", start="latest")
    exact = await topic.subscribe("exact", start=p3)
    await topic.publish(b"new")
    assert [r.payload for r in await drain(late)] == [b"new"]
    assert [r.payload for r in await drain(exact)] == [b"old3", b"new"]
