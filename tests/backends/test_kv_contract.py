"""The KV contract, run against every driver on its real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from podkit.backends import KV, Event, LeaseExpired, open_kv


@pytest.fixture
async def kv(kv_url: str) -> AsyncIterator[KV]:
    store = await open_kv(kv_url)
    yield store
    await store.close()


async def test_put_get_and_revisions(kv: KV) -> None:
    assert await kv.get("a") is None
    r1 = await kv.put("a", b"one")
    r2 = await kv.put("b", b"two")
    r3 = await kv.put("a", b"three")
    assert r1 < r2 < r3
    a = await kv.get("a")
    assert a is not None
    assert (a.key, a.value, a.revision, a.created, a.lease) == ("a", b"three", r3, r1, None)


async def test_binary_and_empty_values(kv: KV) -> None:
    blob = bytes(range(256)) * 4
    await kv.put("bin", blob)
    await kv.put("empty", b"")
    got = await kv.get("bin")
    assert got is not None and got.value == blob
    empty = await kv.get("empty")
    assert empty is not None and empty.value == b""


async def test_compare_and_swap(kv: KV) -> None:
    r1 = await kv.create("lock", b"me")
    assert r1 is not None
    assert await kv.create("lock", b"you") is None
    assert await kv.update("lock", b"x", revision=r1 - 1) is None
    r2 = await kv.update("lock", b"me2", revision=r1)
    assert r2 is not None and r2 > r1
    assert await kv.update("lock", b"stale", revision=r1) is None
    assert await kv.update("absent", b"x", revision=r1) is None
    assert not await kv.delete_if("lock", revision=r1)
    assert await kv.delete_if("lock", revision=r2)
    assert await kv.get("lock") is None
    r3 = await kv.create("lock", b"again")
    assert r3 is not None and r3 > r2


async def test_delete(kv: KV) -> None:
    await kv.put("k", b"v")
    assert await kv.delete("k")
    assert not await kv.delete("k")
    assert await kv.get("k") is None


async def test_range_is_sorted_and_scoped(kv: KV) -> None:
    for key in ("svc/b", "svc/a", "svc/c", "svcx", "other/a"):
        await kv.put(key, key.encode())
    got = await kv.range("svc/")
    assert [e.key for e in got] == ["svc/a", "svc/b", "svc/c"]
    assert [e.value for e in got] == [b"svc/a", b"svc/b", b"svc/c"]
    assert await kv.range("nothing/") == []


async def test_concurrent_creates_have_one_winner(kv: KV) -> None:
    results = await asyncio.gather(*(kv.create("leader", str(i).encode()) for i in range(10)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1


async def test_lease_expires_with_its_keys(kv: KV) -> None:
    lease = await kv.grant(1.0)
    await kv.put("session/x", b"alive", lease=lease)
    await kv.put("plain", b"stays")
    got = await kv.get("session/x")
    assert got is not None and got.lease == lease
    start = time.monotonic()
    while await kv.get("session/x") is not None:
        assert time.monotonic() - start < 2.5, "key outlived its lease by more than 1.5 s"
        await asyncio.sleep(0.05)
    assert time.monotonic() - start >= 0.5
    assert await kv.get("plain") is not None
    assert not await kv.keep_alive(lease)
    with pytest.raises(LeaseExpired):
        await kv.put("session/y", b"late", lease=lease)


async def test_keep_alive_extends_a_lease(kv: KV) -> None:
    lease = await kv.grant(1.0)
    await kv.put("held", b"1", lease=lease)
    for _ in range(8):  # 2.4 s, well past the TTL
        await asyncio.sleep(0.3)
        assert await kv.keep_alive(lease)
    assert await kv.get("held") is not None


async def test_revoke_deletes_at_once(kv: KV) -> None:
    lease = await kv.grant(30.0)
    await kv.put("r/1", b"1", lease=lease)
    await kv.put("r/2", b"2", lease=lease)
    await kv.revoke(lease)
    assert await kv.range("r/") == []


async def _collect(it: AsyncIterator[Event], n: int, timeout: float = 5.0) -> list[Event]:
    out: list[Event] = []

    async def run() -> None:
        async for ev in it:
            out.append(ev)
            if len(out) == n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_watch_key_sees_puts_and_deletes_in_order(kv: KV) -> None:
    watch = kv.watch("cfg")
    task = asyncio.create_task(_collect(watch, 3))
    await asyncio.sleep(0.3)  # let the watch start
    r1 = await kv.put("cfg", b"1")
    await kv.put("other", b"x")
    r2 = await kv.put("cfg", b"2")
    await kv.delete("cfg")
    events = await task
    assert [(e.kind, e.value) for e in events] == [("put", b"1"), ("put", b"2"), ("delete", None)]
    assert events[0].revision == r1 and events[1].revision == r2
    assert events[2].revision > r2


async def test_a_change_made_while_the_consumer_is_busy_arrives_at_once(kv: KV) -> None:
    """A consumer that writes between two events (as a config sync or an election does)
    gets the next event promptly, not after the watch's idle wait."""
    watch = kv.watch("busy")
    got: list[float] = []

    async def consume() -> None:
        async for event in watch:
            got.append(time.monotonic())
            if event.value == b"1":
                await kv.put("busy", b"2")  # while holding the first event
            else:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    await kv.put("busy", b"1")
    await asyncio.wait_for(task, 5)
    assert got[1] - got[0] < 0.5, f"second event after {got[1] - got[0]:.3f} s"


async def test_watch_prefix_from_a_past_revision(kv: KV) -> None:
    r1 = await kv.put("jobs/1", b"a")
    await kv.put("elsewhere", b"x")
    await kv.put("jobs/2", b"b")
    await kv.delete("jobs/1")
    events = await _collect(kv.watch("jobs/", prefix=True, start_revision=r1), 3)
    assert [(e.kind, e.key) for e in events] == [
        ("put", "jobs/1"),
        ("put", "jobs/2"),
        ("delete", "jobs/1"),
    ]
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == 3


async def test_revision_then_range_then_watch_misses_nothing(kv: KV) -> None:
    r1 = await kv.put("svc/a", b"1")
    assert await kv.revision() >= r1
    start = await kv.revision()
    await kv.put("svc/b", b"2")  # after the revision was read, before the range
    assert [e.key for e in await kv.range("svc/")] == ["svc/a", "svc/b"]
    await kv.delete("svc/a")  # after the range, before the watch starts
    assert await kv.revision() > start
    events = await _collect(kv.watch("svc/", prefix=True, start_revision=start + 1), 2)
    assert [(e.kind, e.key) for e in events] == [("put", "svc/b"), ("delete", "svc/a")]


async def test_watch_sees_lease_expiry(kv: KV) -> None:
    lease = await kv.grant(1.0)
    rev = await kv.put("member/a", b"up", lease=lease)
    events = await _collect(kv.watch("member/", prefix=True, start_revision=rev), 2, timeout=6)
    assert [e.kind for e in events] == ["put", "delete"]


def _with_prefix(url: str, prefix: str) -> str:
    """`url` with `?prefix=` set (a later value wins over the suite's own)."""
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


async def test_two_prefixes_on_one_store_never_share_keys(kv_url: str) -> None:
    a, b, a_again = [await open_kv(_with_prefix(kv_url, p)) for p in ("pa", "pb", "pa")]
    try:
        ra = await a.put("k", b"of a")
        await b.put("k", b"of b")
        await b.put("k2", b"of b")
        got_a, got_b, got_a2 = await a.get("k"), await b.get("k"), await a_again.get("k")
        assert got_a is not None and (got_a.key, got_a.value) == ("k", b"of a")
        assert got_b is not None and got_b.value == b"of b"
        assert got_a2 is not None and got_a2.revision == ra  # one prefix: one namespace
        assert [e.key for e in await a.range("")] == ["k"]
        assert [e.key for e in await b.range("k")] == ["k", "k2"]
        rev = await a.revision()
        assert await b.delete("k")
        await a.put("k", b"again")
        events = await _collect(a.watch("k", start_revision=rev + 1), 1)
        assert [(e.kind, e.key, e.value) for e in events] == [("put", "k", b"again")]
    finally:
        for kv in (a, b, a_again):
            await kv.close()
