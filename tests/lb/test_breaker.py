"""Circuit breaking per upstream, the retry budget, retryability and timeouts."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podkit.clock import ManualClock
from podkit.lb.breaker import (
    Breaker,
    Limits,
    Refusal,
    RetryBudget,
    RetryPolicy,
    Ticket,
)
from podkit.net.proxy.retry import RetryRate, is_retryable


def admitted(result: Ticket | Refusal) -> Ticket:
    assert isinstance(result, Ticket), result
    return result


@pytest.mark.parametrize(
    ("kind", "limits"),
    [
        ("requests", Limits(max_requests=3)),
        ("pending", Limits(max_pending=3)),
        ("connections", Limits(max_connections=3)),
    ],
)
def test_each_limit_refuses_over_it_until_a_slot_is_released(kind: str, limits: Limits) -> None:
    breaker = Breaker(limits)
    admit = {
        "requests": breaker.admit_request,
        "pending": breaker.admit_pending,
        "connections": breaker.admit_connection,
    }[kind]
    tickets = [admitted(admit()) for _ in range(3)]
    refused = admit()
    assert isinstance(refused, Refusal) and refused.reason == kind
    assert breaker.overflows[refused.reason] == 1
    tickets[0].release()
    tickets[0].release()  # a second release gives nothing back twice
    admitted(admit())
    assert isinstance(admit(), Refusal)


def test_limits_are_independent() -> None:
    breaker = Breaker(Limits(max_connections=1, max_pending=1, max_requests=1))
    admitted(breaker.admit_connection())
    admitted(breaker.admit_pending())
    admitted(breaker.admit_request())
    assert (breaker.connections, breaker.pending, breaker.requests) == (1, 1, 1)


def test_retry_budget_is_a_share_of_active_requests_with_a_floor() -> None:
    breaker = Breaker(budget=RetryBudget(percent=20, min_concurrency=3))
    requests = [admitted(breaker.admit_request()) for _ in range(10)]
    retries = [breaker.admit_retry() for _ in range(5)]
    assert sum(isinstance(r, Ticket) for r in retries) == 3  # 20% of 10 is under the floor
    last = retries[-1]
    assert isinstance(last, Refusal) and last.reason == "retries"
    for _ in range(90):
        requests.append(admitted(breaker.admit_request()))
    more = [breaker.admit_retry() for _ in range(30)]
    assert breaker.retries <= 0.2 * breaker.requests
    assert breaker.retries == 25  # the most r with r <= 20% of (100 + r) requests in flight
    for r in [*retries, *more]:
        if isinstance(r, Ticket):
            r.release()
    assert (breaker.retries, breaker.requests) == (0, 100)
    assert isinstance(breaker.admit_retry(), Ticket)


def test_a_retry_also_needs_room_under_max_requests() -> None:
    breaker = Breaker(Limits(max_requests=2))
    admitted(breaker.admit_request())
    admitted(breaker.admit_request())
    refused = breaker.admit_retry()
    assert isinstance(refused, Refusal) and refused.reason == "requests"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["req", "retry", "done"]), max_size=300))
def test_retries_in_flight_stay_within_the_budget(ops: list[str]) -> None:
    breaker = Breaker(Limits(max_requests=50), RetryBudget(percent=20, min_concurrency=3))
    held: list[Ticket] = []
    rng = random.Random(len(ops))
    for op in ops:
        if op == "done":
            if held:
                held.pop(rng.randrange(len(held))).release()
            continue
        result = breaker.admit_request() if op == "req" else breaker.admit_retry()
        if isinstance(result, Ticket):
            held.append(result)
            if op == "retry":
                assert breaker.retries <= max(3, 0.2 * breaker.requests)
        elif op == "retry":  # refused only over the floor, or with no room at all
            assert breaker.retries >= 3 or breaker.requests == 50
        assert breaker.requests <= 50
    assert breaker.requests == len(held)
    for t in held:
        t.release()
    assert (breaker.requests, breaker.retries) == (0, 0)


def test_retry_rate_is_a_share_of_recent_requests_plus_a_floor() -> None:
    rate = RetryRate(percent=20, per_second=10, window=10)
    rate.observe(0.0, 0)
    # no request yet: the floor alone, 10 a second (the first second counts whole)
    assert sum(rate.allow(0.5, 0) for _ in range(15)) == 10
    assert (rate.allowed, rate.refused) == (10, 5)
    # 1,000 first tries over 5 s earn 200 more; the floor has grown to 50
    for t in range(1, 6):
        rate.observe(float(t), 200 * t + 10)  # the 10 retries counted among the tries
    granted = 0
    for _ in range(400):  # each granted retry is one more try once it ends
        granted += rate.allow(5.0, 1010 + granted)
    assert granted == 200 + 50 - 10
    assert not rate.allow(5.0, 1010 + granted)


def test_retry_rate_earnings_expire_with_the_window() -> None:
    rate = RetryRate(percent=20, per_second=0, window=10)
    rate.observe(0.0, 0)
    rate.observe(1.0, 1000)  # a busy second, then nothing for a long time
    for t in range(2, 40):
        rate.observe(float(t), 1000)
    assert not rate.allow(39.5, 1000)  # the busy second left the window: nothing banked
    rate.observe(40.0, 1100)
    granted = 0
    for _ in range(50):
        granted += rate.allow(40.0, 1100 + granted)
    assert granted == 20  # 20% of the recent 100


def test_exempt_retries_earn_no_budget() -> None:
    """100 tries, 50 of them retries of failed connects (exempt): 50 first tries earn 10."""
    rate = RetryRate(percent=20, per_second=0, window=10)
    rate.observe(0.0, 0)
    for _ in range(50):
        rate.exempt()
    granted = 0
    for _ in range(40):
        granted += rate.allow(1.0, 100 + granted)
    assert granted == 10


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 3), st.integers(0, 200), st.integers(0, 100)),
        max_size=40,
    )
)
def test_retries_never_exceed_the_share_of_first_tries(
    steps: list[tuple[float, int, int]],
) -> None:
    """Whatever the traffic, without the floor the retries granted are at most 20% of the
    first tries: at most 20% extra load."""
    rate = RetryRate(percent=20, per_second=0, window=10)
    now, requests = 0.0, 0
    rate.observe(now, requests)
    for dt, firsts, wanted in steps:
        now += dt
        for _ in range(wanted):
            if rate.allow(now, requests):
                requests += 1  # a granted retry is one more try
        requests += firsts
        rate.observe(now, requests)
        assert rate.allowed <= 0.2 * (requests - rate.allowed)


def test_retryable_requests() -> None:
    for method in (b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"):
        assert is_retryable(method, [])
    assert not is_retryable(b"POST", [])
    assert not is_retryable(b"PATCH", [(b"X-Other", b"1")])
    assert is_retryable(b"POST", [(b"X-Podkit-Retry", b"1")])
    assert is_retryable(b"POST", [(b"x-podkit-retry", b" true ")])
    assert not is_retryable(b"POST", [(b"x-podkit-retry", b"0")])


async def test_per_try_timeout_within_the_overall_deadline() -> None:
    clock = ManualClock()
    policy = RetryPolicy(per_try_timeout=2.0, timeout=5.0)
    started = clock.now()
    assert policy.try_timeout(started, clock.now()) == 2.0
    await clock.advance(4)
    assert policy.try_timeout(started, clock.now()) == 1.0  # only 1 s of the 5 left
    await clock.advance(1.5)
    assert policy.try_timeout(started, clock.now()) <= 0  # spent: answer 504
    assert RetryPolicy(timeout=3.0).try_timeout(0.0, 1.0) == 2.0


async def test_retry_delay_only_for_retried_outcomes_within_attempts_and_time() -> None:
    clock = ManualClock()
    policy = RetryPolicy(max_retries=2, timeout=1.0, backoff_base=0.025, backoff_max=0.06)
    rng = random.Random(1)
    started = clock.now()
    for status in (0, 502, 503, 504):
        delay = policy.retry_delay(0, status, started, clock.now(), rng)
        assert delay is not None and 0 <= delay <= 0.025
    for status in (200, 404, 500):
        assert policy.retry_delay(0, status, started, clock.now(), rng) is None
    second = policy.retry_delay(1, 503, started, clock.now(), rng)
    assert second is not None and 0 <= second <= 0.05
    assert policy.retry_delay(2, 503, started, clock.now(), rng) is None  # 2 retries used
    delays = [policy.retry_delay(5, 503, 0.0, 0.0, rng) for _ in range(5)]
    assert delays == [None] * 5
    capped = RetryPolicy(max_retries=10, backoff_base=0.025, backoff_max=0.06)
    assert all((capped.retry_delay(8, 503, 0.0, 0.0, rng) or 0) <= 0.06 for _ in range(50))
    await clock.advance(0.999)
    late = [policy.retry_delay(0, 503, started, clock.now(), rng) for _ in range(50)]
    assert all(d is None or clock.now() + d < started + 1.0 for d in late)
