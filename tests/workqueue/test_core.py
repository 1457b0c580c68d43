"""WorkQueue: at-least-once delivery, retries, dead letters, heartbeats, shutdown."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from podkit.backends import KV, Event, open_kv
from podkit.workqueue import RetryPolicy, WorkQueue
from podkit.workqueue.core import encode


@pytest.fixture(params=["memory", "sqlite"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "memory":
        yield f"memory://wq-{uuid.uuid4().hex}"
    else:
        yield f"sqlite:///{tmp_path / 'jobs.db'}"


def test_retry_policy_backs_off_with_jitter() -> None:
    p = RetryPolicy(base=1, maximum=10)
    rng = random.Random(7)
    delays = [p.delay(a, rng) for a in range(1, 7)]
    for attempt, d in enumerate(delays, start=1):
        full = min(10, 2 ** (attempt - 1))
        assert full / 2 <= d <= full
    assert RetryPolicy(base=1, maximum=10, jitter=False).delay(9) == 10


async def test_every_item_is_processed_once_and_results_are_awaitable(url: str) -> None:
    wq = await WorkQueue.open(url, "sq", results="memory://results-" + uuid.uuid4().hex)
    ids = await wq.enqueue_many([{"n": i} for i in range(300)])
    single = await wq.enqueue(b"\x01raw bytes")
    seen: list[object] = []

    async def handler(item: object) -> object:
        seen.append(item)
        return item["n"] * 2 if isinstance(item, dict) else len(item)  # type: ignore[arg-type]

    stats = await wq.run(handler, concurrency=16, drain=True)
    assert stats.done == 301 and stats.failed == 0
    assert sorted(x["n"] for x in seen if isinstance(x, dict)) == list(range(300))
    assert b"\x01raw bytes" in seen
    assert await wq.result(ids[7], timeout=2) == 14
    assert await wq.result(single, timeout=2) == 10
    s = await wq.stats()
    assert (s.depth, s.in_flight, s.dead) == (0, 0, 0)
    await wq.close()


async def test_idempotency_keys_enqueue_once(url: str) -> None:
    wq = await WorkQueue.open(url, "keys")
    a = await wq.enqueue({"order": 7}, key="order-7")
    b = await wq.enqueue({"order": 7}, key="order-7")
    assert a == b and (await wq.stats()).depth == 1
    await wq.close()


async def test_failures_retry_with_backoff_then_dead_letter(url: str) -> None:
    wq = await WorkQueue.open(
        url, "fail", max_attempts=3, retry=RetryPolicy(base=0.05, jitter=False)
    )
    await wq.enqueue({"poison": True})
    await wq.enqueue({"ok": True})
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    def handler(item: dict[str, bool]) -> None:  # a sync handler: runs in a thread
        if item.get("poison"):
            calls.append(loop.time())
            raise ValueError("cannot parse the poison item")

    stats = await wq.run(handler, drain=True)
    assert stats.done == 1 and stats.failed == 3
    assert len(calls) == 3
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09  # 0.05 s, then 0.1 s
    (dead,) = await wq.queue.dead_letters()
    assert dead.attempts == 3
    assert dead.last_error == "ValueError: cannot parse the poison item"
    await wq.close()


async def test_heartbeats_keep_a_long_item_from_a_second_worker(url: str) -> None:
    wq1 = await WorkQueue.open(url, "long", visibility=0.6)
    wq2 = await WorkQueue.open(url, "long", visibility=0.6)
    await wq1.enqueue("slow")
    runs: list[str] = []

    async def slow(item: str) -> None:
        runs.append("w1")
        await asyncio.sleep(2.0)  # more than three visibilities

    async def other(item: str) -> None:
        runs.append("w2")

    t1 = asyncio.create_task(wq1.run(slow, drain=True))
    await asyncio.sleep(0.2)
    t2 = asyncio.create_task(wq2.run(other, drain=True))
    s1, s2 = await asyncio.gather(t1, t2)
    assert runs == ["w1"] and s1.done == 1 and s2.done == 0
    await wq1.close()
    await wq2.close()


async def test_a_dead_worker_loses_nothing(url: str) -> None:
    """A worker that stops mid-item without acking (as if killed): the item comes back."""
    wq = await WorkQueue.open(url, "crash", visibility=0.5)
    await wq.enqueue_many(list(range(5)))
    got = await wq.queue.dequeue(5, visibility=0.5)  # a worker took them, then died
    assert len(got) == 5
    done: list[int] = []

    async def handler(item: int) -> None:
        done.append(item)

    await asyncio.sleep(0.6)
    stats = await wq.run(handler, drain=True)
    assert sorted(done) == [0, 1, 2, 3, 4] and stats.done == 5
    await wq.close()


async def test_graceful_stop_finishes_or_returns_items_in_hand(url: str) -> None:
    wq = await WorkQueue.open(url, "stop", visibility=30)
    await wq.enqueue_many(list(range(6)))
    started: list[int] = []
    finished: list[int] = []

    async def handler(item: int) -> None:
        started.append(item)
        await asyncio.sleep(0.1 if item < 3 else 10)
        finished.append(item)

    task = asyncio.create_task(wq.run(handler, concurrency=6, grace=0.5))
    deadline = asyncio.get_running_loop().time() + 10
    while len(started) < 6:
        if task.done():
            raise AssertionError(f"the worker stopped early: {task.result()}")
        assert asyncio.get_running_loop().time() < deadline, f"only {started} started"
        await asyncio.sleep(0.01)
    wq.stop()
    stats = await asyncio.wait_for(task, 5)
    assert sorted(finished) == [0, 1, 2] and stats.done == 3 and stats.returned == 3
    s = await wq.stats()
    assert (s.depth, s.in_flight) == (3, 0)  # handed back at once, not after 30 s
    await wq.close()


async def test_prefetched_items_wait_their_turn_and_go_back_at_once_on_stop(url: str) -> None:
    wq = await WorkQueue.open(url, "ahead", visibility=30)
    await wq.enqueue_many(list(range(6)))
    started: list[int] = []

    async def handler(item: int) -> None:
        started.append(item)
        await asyncio.sleep(10)

    task = asyncio.create_task(wq.run(handler, concurrency=2, prefetch=3, grace=2))
    deadline = asyncio.get_running_loop().time() + 10
    while len(started) < 2 or (await wq.stats()).in_flight < 5:
        assert not task.done(), f"the worker stopped early: {task.result()}"
        assert asyncio.get_running_loop().time() < deadline, f"only {started} started"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert started == [0, 1]  # two run; three more are leased and wait
    wq.stop()
    stop = asyncio.get_running_loop().time()
    while (await wq.stats()).depth < 4:  # the three waiting are back during the grace
        assert asyncio.get_running_loop().time() < stop + 1, "not returned at once"
        await asyncio.sleep(0.01)
    assert not task.done() and started == [0, 1]
    stats = await asyncio.wait_for(task, 5)
    assert stats.done == 0 and stats.returned == 5
    s = await wq.stats()
    assert (s.depth, s.in_flight) == (6, 0)  # handed back at once, not after 30 s
    await wq.close()


async def test_prefetched_items_are_kept_from_a_second_worker(url: str) -> None:
    wq1 = await WorkQueue.open(url, "ahead-long", visibility=0.6)
    wq2 = await WorkQueue.open(url, "ahead-long", visibility=0.6)
    await wq1.enqueue_many(["a", "b"])
    runs: list[tuple[str, str]] = []

    async def slow(item: str) -> None:
        runs.append(("w1", item))
        await asyncio.sleep(1.5 if item == "a" else 0)  # "b" waits past two visibilities

    async def other(item: str) -> None:
        runs.append(("w2", item))

    t1 = asyncio.create_task(wq1.run(slow, concurrency=1, prefetch=1, drain=True))
    await asyncio.sleep(0.2)
    t2 = asyncio.create_task(wq2.run(other, drain=True))
    s1, s2 = await asyncio.gather(t1, t2)
    assert runs == [("w1", "a"), ("w1", "b")] and s1.done == 2 and s2.done == 0
    await wq1.close()
    await wq2.close()


async def test_a_backend_outage_does_not_end_the_worker() -> None:
    from podkit.backends import BackendUnavailable, open_queue

    inner = await open_queue(f"memory://outage-{uuid.uuid4().hex}", "jobs")
    failures = {"left": 4}

    class Flaky:
        def __getattr__(self, name: str) -> object:
            return getattr(inner, name)

        async def dequeue(self, *args: object, **kwargs: object) -> object:
            if failures["left"] > 0:
                failures["left"] -= 1
                raise BackendUnavailable("memory://x: no answer (test)")
            return await inner.dequeue(*args, **kwargs)  # type: ignore[arg-type]

    wq = WorkQueue(Flaky())  # type: ignore[arg-type]
    await wq.enqueue_many([1, 2, 3])
    done: list[int] = []
    stats = await asyncio.wait_for(wq.run(done.append, drain=True), 20)
    assert sorted(done) == [1, 2, 3] and stats.outages == 4


async def test_apply_once_makes_a_redelivered_effect_happen_once() -> None:
    from podkit.backends import open_kv
    from podkit.workqueue import EFFECTS, apply_once

    kv = await open_kv("memory://")
    wq = await WorkQueue.open("memory://", "once", visibility=0.2)
    await wq.enqueue({"order": 7}, key="order-7")
    seen: list[bool] = []
    first = True

    async def handler(item: dict[str, int]) -> None:
        nonlocal first
        seen.append(await apply_once(kv, f"order-{item['order']}"))
        if first:  # the worker dies after the effect, before the ack: delivered again
            first = False
            raise RuntimeError("crashed after the effect")

    await wq.run(handler, concurrency=1, drain=True)
    assert seen == [True, False]  # applied on the first delivery only
    assert [e.key for e in await kv.range(EFFECTS)] == [f"{EFFECTS}order-7"]
    await wq.close()
    await kv.close()


class LateWatch:
    """A KV whose watches come up 0.3 s late, as on a busy host."""

    def __init__(self, inner: KV) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def watch(self, key: str, **kw: Any) -> AsyncIterator[Event]:
        await asyncio.sleep(0.3)
        async for event in self.inner.watch(key, **kw):
            yield event


async def test_a_result_stored_before_the_watch_is_up_is_not_missed() -> None:
    results = await open_kv(f"memory://results-{uuid.uuid4().hex}")
    wq = await WorkQueue.open(f"memory://wq-{uuid.uuid4().hex}", "late")
    wq.results = LateWatch(results)  # type: ignore[assignment]
    item = await wq.enqueue({"n": 1})
    waiting = asyncio.create_task(wq.result(item, timeout=2))
    await asyncio.sleep(0.1)  # result() has read (nothing yet) and is starting its watch
    await results.put(wq._result_key(item), encode(42))
    assert await waiting == 42
    await wq.close()


async def test_heartbeats_run_on_the_injected_clock() -> None:
    """With a manual clock nothing waits in real time: the item's visibility (30 s) is
    extended every 10 s of that clock, so after 45 s another worker still gets nothing,
    and once the item is done it is acked."""
    from podkit.clock import ManualClock

    clock = ManualClock()
    url = f"memory://wq-{uuid.uuid4().hex}"
    wq = await WorkQueue.open(url, "hb", visibility=30, clock=clock)
    other = await WorkQueue.open(url, "hb", visibility=30, clock=clock)
    await wq.enqueue("long")
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(item: Any) -> None:
        started.set()
        await release.wait()

    run = asyncio.create_task(wq.run(handler, concurrency=1))
    await asyncio.wait_for(started.wait(), 5)
    for _ in range(9):  # 45 s, 5 s at a time: heartbeats at 10, 20, 30 and 40
        await clock.advance(5)
        for _ in range(20):
            await asyncio.sleep(0)
    assert await other.queue.dequeue(1, visibility=30, wait=0) == []
    assert (await wq.stats()).in_flight == 1
    release.set()
    for _ in range(50):
        await clock.advance(0.1)  # the ack's batching waits on the clock too
        await asyncio.sleep(0)
        if (await wq.stats()).in_flight == 0:
            break
    assert (await wq.stats()).in_flight == 0 and (await wq.stats()).depth == 0
    wq.stop()
    await asyncio.wait_for(run, 5)
