"""Token buckets per key and global: rates, Retry-After, bounded tables."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import signal
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from podkit.clock import ManualClock
from podkit.lb.ratelimit import Rate, RateLimiter, SharedBuckets


def test_rates_parse_from_text() -> None:
    assert Rate.parse("100/s burst 200") == Rate(100.0, 200.0)
    assert Rate.parse("600/m") == Rate(10.0, 10.0)  # burst: one second's worth
    assert Rate.parse("  30 / minute ") == Rate(0.5, 1.0)  # at least one token
    assert Rate.parse("7200/h burst 5") == Rate(2.0, 5.0)
    assert Rate.parse("86400/day") == Rate(1.0, 1.0)
    assert Rate.parse("2.5/S") == Rate(2.5, 2.5)


@pytest.mark.parametrize("text", ["", "100", "100/x", "0/s", "-1/s", "10/s burst", "s/10", "1/s 2"])
def test_malformed_rates_are_refused_with_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        Rate.parse(text)


async def test_burst_then_refusal_with_retry_after_rounded_up() -> None:
    clock = ManualClock()
    limiter = RateLimiter("2/s burst 4", clock=clock)
    assert [limiter.check("1.2.3.4") for _ in range(4)] == [0, 0, 0, 0]
    assert limiter.check("1.2.3.4") == 1  # half a second to the next token, rounded up
    await clock.advance(0.5)
    assert limiter.check("1.2.3.4") == 0
    assert limiter.check("1.2.3.4") == 1
    slow = RateLimiter("1/m", clock=clock)
    assert slow.check("k") == 0
    assert slow.check("k") == 60
    await clock.advance(59)
    assert slow.check("k") == 1
    await clock.advance(1)
    assert slow.check("k") == 0
    assert (limiter.admitted, limiter.limited) == (5, 2)


async def test_each_key_has_its_own_bucket() -> None:
    limiter = RateLimiter("1/s", clock=ManualClock())
    assert limiter.check("a") == 0
    assert limiter.check("a") > 0
    assert limiter.check("b") == 0


async def test_global_bucket_caps_all_keys_and_refusals_cost_nothing() -> None:
    clock = ManualClock()
    limiter = RateLimiter("2/s", global_rate="3/s", clock=clock)
    results = [limiter.check(k) for k in ("a", "a", "b", "b")]
    assert results[:3] == [0, 0, 0] and results[3] >= 1  # the 4th is over the global rate
    await clock.advance(1 / 3)  # one global token back; b's bucket still has one
    assert limiter.check("b") == 0
    only_global = RateLimiter(global_rate="1/s", clock=clock)
    assert [only_global.check(k) for k in "xyz"] == [0, 1, 1]


def test_keys_from_ip_or_header() -> None:
    by_ip = RateLimiter("1/s")
    assert by_ip.key("10.0.0.1", [(b"X-Api-Key", b"k1")]) == "10.0.0.1"
    by_header = RateLimiter("1/s", by="header:X-Api-Key")
    assert by_header.key("10.0.0.1", [(b"x-api-key", b"k1")]) == b"k1"
    assert by_header.key("10.0.0.1", [(b"Other", b"v")]) == "10.0.0.1"
    with pytest.raises(ValueError, match="header"):
        RateLimiter("1/s", by="cookie")


async def test_table_stays_bounded_and_drops_refilled_buckets_first() -> None:
    clock = ManualClock()
    limiter = RateLimiter("1/s burst 5", clock=clock, max_keys=8)
    for n in range(7):
        limiter.check(f"idle-{n}")
    await clock.advance(10)  # the idle buckets have refilled: as good as new
    for _ in range(5):
        assert limiter.check("heavy") == 0
    assert limiter.check("heavy") > 0
    for n in range(6):  # the table is full: the refilled buckets make room
        limiter.check(f"new-{n}")
    assert len(limiter) <= 8
    assert limiter.evicted == 0  # only full buckets were dropped
    assert limiter.check("heavy") > 0  # its empty bucket was kept
    for n in range(10_000):
        limiter.check(f"flood-{n}")
    assert len(limiter) <= 8


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["1/s burst 1", "5/s burst 10", "100/m", "3/s burst 3"]),
    st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=80),
    st.lists(st.sampled_from("ab"), min_size=80, max_size=80),
)
def test_never_admits_more_than_rate_times_t_plus_burst(
    text: str, gaps: list[float], keys: list[str]
) -> None:
    rate = Rate.parse(text)
    global_rate = Rate(rate.per_second * 1.5, rate.burst + 1)

    async def run() -> dict[str, list[float]]:
        clock = ManualClock()
        limiter = RateLimiter(rate, global_rate=global_rate, clock=clock)
        admitted: dict[str, list[float]] = {"a": [], "b": [], "all": []}
        for gap, key in zip(gaps, keys, strict=False):
            await clock.advance(gap)
            retry_after = limiter.check(key)
            if not retry_after:
                admitted[key].append(clock.now())
                admitted["all"].append(clock.now())
            else:
                assert isinstance(retry_after, int) and retry_after >= 1
        return admitted

    admitted = asyncio.run(run())
    for name, times in admitted.items():
        r = global_rate if name == "all" else rate
        for i in range(len(times)):  # every window [times[i], times[j]]
            for j in range(i, len(times)):
                count = j - i + 1
                assert count <= r.per_second * (times[j] - times[i]) + r.burst + 1e-9


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 500),
    st.sampled_from(["s", "m", "h"]),
    st.integers(1, 20),
    st.floats(0, 5, allow_nan=False),
)
@example(4, "h", 1, 1.0)  # refills of 1 s, 898 s and 1 s summed to just under a token
def test_retry_after_is_the_wait_rounded_up(
    count: int, unit: str, burst: int, pause: float
) -> None:
    async def run() -> None:
        clock = ManualClock()
        limiter = RateLimiter(f"{count}/{unit} burst {burst}", clock=clock)
        while limiter.check("k") == 0:
            pass
        await clock.advance(pause)
        retry_after = limiter.check("k")
        if retry_after:
            await clock.advance(retry_after - 1)
            assert retry_after == 1 or limiter.check("k") > 0  # not a second too early
            await clock.advance(1)
            assert limiter.check("k") == 0  # and enough

    asyncio.run(run())


def _hammer(shared: SharedBuckets, key: str, n: int, out: multiprocessing.Queue[int]) -> None:
    limiter = RateLimiter("10/s burst 10", global_rate="1000/s", shared=shared)
    out.put(sum(limiter.check(key) == 0 for _ in range(n)))


def test_shared_buckets_limit_forked_processes_together() -> None:
    """Two forked processes, each with its own RateLimiter on the same SharedBuckets: a
    key gets its burst once between them, not once each; other keys are not touched."""
    ctx = multiprocessing.get_context("fork")
    shared = SharedBuckets(max_keys=1024)
    out: multiprocessing.Queue[int] = ctx.Queue()
    started = time.monotonic()
    procs = [ctx.Process(target=_hammer, args=(shared, "10.0.0.1", 200, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    elapsed = time.monotonic() - started
    admitted = out.get(timeout=5) + out.get(timeout=5)
    assert 10 <= admitted <= 10 + 10 * elapsed + 1, (admitted, elapsed)
    # another key has its own bucket; the parent shares it too
    limiter = RateLimiter("10/s burst 10", shared=shared)
    assert sum(limiter.check("10.0.0.2") == 0 for _ in range(10)) == 10
    assert limiter.check("10.0.0.1") > 0 or elapsed > 1


def test_a_process_killed_holding_a_slot_does_not_block_the_others() -> None:
    shared = SharedBuckets(max_keys=1)  # one group of slots for every key
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()

    def hold() -> None:
        fcntl.lockf(shared._fd, fcntl.LOCK_EX)  # the whole table, and never let go
        ready.set()
        time.sleep(60)

    p = ctx.Process(target=hold)
    p.start()
    assert ready.wait(10)
    os.kill(p.pid or 0, signal.SIGKILL)
    p.join(10)
    limiter = RateLimiter("10/s burst 10", global_rate="5/s", shared=shared)
    assert limiter.check("k") == 0  # the kernel released the dead process's lock
    assert sum(limiter.check("k") == 0 for _ in range(10)) == 4  # the global burst of 5


def test_keys_crowding_one_group_of_slots_are_limited_more_never_less() -> None:
    """20 keys on one group of 8 slots, each allowed 1 a minute: no key gets a fresh
    bucket while its slot is taken by another active key."""
    shared = SharedBuckets(max_keys=1)
    limiter = RateLimiter("1/m burst 1", shared=shared)
    admitted = {k: sum(limiter.check(f"10.0.0.{k}") == 0 for _ in range(5)) for k in range(20)}
    assert all(n <= 1 for n in admitted.values()), admitted
    assert sum(admitted.values()) == 8  # the group's 8 slots, one key each
    assert limiter.evicted == 12 * 5  # the other 12 keys shared a spent bucket each time
