"""Host eligibility: readiness, active checks, outlier ejection, draining."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from podkit.clock import ManualClock
from podkit.lb.health import (
    CONNECT_ERROR,
    HEALTHY,
    STALE,
    UNHEALTHY,
    ActiveCheck,
    HealthEvent,
    HostHealth,
    Outliers,
    SharedHealth,
    owner_of,
)

A, B, C = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"


def fleet(
    hosts: list[str], outliers: Outliers | None = None, active: ActiveCheck | None = None
) -> tuple[HostHealth, ManualClock, list[HealthEvent]]:
    clock = ManualClock()
    events: list[HealthEvent] = []
    health = HostHealth(active, outliers or Outliers(), clock=clock, on_event=events.append)
    health.set_hosts(hosts)
    return health, clock, events


def fail(health: HostHealth, host: str, times: int, status: int = 503) -> None:
    for _ in range(times):
        health.begin(host)
        health.record_result(host, status)


def test_not_ready_hosts_get_no_traffic() -> None:
    health, _, events = fleet([A, B])
    assert health.eligible() == (A, B)
    health.set_ready(B, False)
    assert health.eligible() == (A,)
    health.add(C, ready=False)
    assert health.eligible() == (A,)
    health.set_ready(C, True)
    assert health.eligible() == (A, C)
    assert [(e.kind, e.host) for e in events] == [("not_ready", B), ("ready", C)]


def test_eligible_is_the_same_tuple_until_something_changes() -> None:
    health, _, _ = fleet([A, B])
    first = health.eligible()
    fail(health, A, 2)
    assert health.eligible() is first


async def test_active_checks_flip_after_consecutive_results() -> None:
    check = ActiveCheck(interval=5, healthy_threshold=2, unhealthy_threshold=3)
    health, clock, events = fleet([A, B], active=check)
    assert health.eligible() == ()  # new hosts wait for their first check
    assert health.due_checks() == [A, B]
    assert health.due_checks() == []  # being checked: not handed out twice
    health.record_check(A, True)
    health.record_check(B, False)
    assert health.eligible() == (A,)
    assert health.next_check_in() == 5
    for _ in range(3):
        await clock.advance(health.next_check_in())
        for host in health.due_checks():
            health.record_check(host, host == B)
    assert health.eligible() == (B,)  # A failed 3 times in a row, B passed 2
    assert [(e.kind, e.host) for e in events] == [
        ("healthy", A),
        ("healthy", B),
        ("unhealthy", A),
    ]
    assert check.passed(200) and check.passed(302) and not check.passed(503)


async def test_a_check_success_between_failures_keeps_a_host_healthy() -> None:
    health, clock, _ = fleet([A], active=ActiveCheck(interval=1, unhealthy_threshold=2))
    for passed in (True, False, True, False, True, False):
        for host in health.due_checks():
            health.record_check(host, passed)
        await clock.advance(1)
    assert health.eligible() == (A,)


def test_consecutive_5xx_eject_and_a_success_resets_the_count() -> None:
    health, _, events = fleet([A, B, C], Outliers(consecutive_5xx=5, max_ejection_percent=50))
    fail(health, A, 4)
    health.begin(A)
    health.record_result(A, 200)
    fail(health, A, 4, status=500)
    assert A in health.eligible()
    fail(health, A, 1, status=502)
    assert health.eligible() == (B, C)
    assert [(e.kind, e.host, e.until) for e in events] == [("ejected", A, 30.0)]
    assert health.ejections == 1


def test_connect_failures_eject_sooner() -> None:
    health, _, _ = fleet([A, B], Outliers(consecutive_5xx=10, consecutive_connect_failures=3))
    fail(health, A, 2, status=CONNECT_ERROR)
    fail(health, A, 1, status=503)  # the connection worked: connect failures start over
    fail(health, A, 2, status=CONNECT_ERROR)
    assert A in health.eligible()  # 5 failures, but only 2 connect failures in a row
    health_b, _, _ = fleet([A, B], Outliers(consecutive_5xx=5, consecutive_connect_failures=3))
    fail(health_b, B, 3, status=CONNECT_ERROR)
    assert health_b.eligible() == (A,)


async def test_ejection_time_grows_with_repeats_up_to_the_cap() -> None:
    rules = Outliers(base_ejection_time=10, max_ejection_time=25, interval=1000)
    health, clock, events = fleet([A, B], rules)
    lengths = []
    for _ in range(4):
        start = clock.now()
        fail(health, A, 5)
        assert A not in health.eligible()
        ejected = events[-1]
        until = ejected.until
        assert ejected.kind == "ejected" and until is not None
        lengths.append(until - start)
        await clock.advance(until - clock.now() - 0.5)
        assert A not in health.eligible()
        await clock.advance(0.5)
        assert A in health.eligible()  # back after its ejection time
        assert events[-1].kind == "returned"
    assert lengths == [10, 20, 25, 25]


async def test_ejection_multiplier_is_forgiven_over_time_back_in_service() -> None:
    rules = Outliers(base_ejection_time=10, max_ejection_time=300, interval=10)
    health, clock, events = fleet([A, B], rules)
    fail(health, A, 5)
    await clock.advance(10)
    fail(health, A, 5)  # right after returning: twice as long
    assert events[-1].until == clock.now() + 20
    await clock.advance(20 + 25)  # back in service for two intervals: both forgiven
    health.eligible()
    fail(health, A, 5)
    assert events[-1].until == clock.now() + 10


def test_max_ejection_percent_caps_ejected_hosts_but_one_may_always_go() -> None:
    hosts = [f"10.0.1.{n}:80" for n in range(10)]
    health, _, events = fleet(hosts, Outliers(max_ejection_percent=20))
    for host in hosts:
        fail(health, host, 5)
    assert len(health.eligible()) == 8
    assert health.ejections == 2 and health.ejections_skipped == 8
    assert sum(e.kind == "ejection_skipped" for e in events) == 8
    small, _, _ = fleet([A, B, C], Outliers(max_ejection_percent=10))
    for host in (A, B, C):
        fail(small, host, 5)
    assert len(small.eligible()) == 2  # 10% of 3 is under one host; one is ejected anyway


def test_removed_host_drains_its_requests_in_flight() -> None:
    health, _, events = fleet([A, B])
    health.begin(A)
    health.begin(A)
    health.set_hosts([B, C])
    assert health.eligible() == (B, C)
    assert A in health.hosts()  # still finishing
    health.record_result(A, 200)
    assert A in health.hosts()
    health.record_result(A, 200)
    assert A not in health.hosts()
    assert [(e.kind, e.host) for e in events] == [("draining", A), ("removed", A)]
    health.remove(B)  # nothing in flight: gone at once
    assert health.hosts() == [C]


def test_a_draining_host_added_again_takes_traffic_again() -> None:
    health, _, _ = fleet([A, B])
    health.begin(A)
    health.remove(A)
    assert health.eligible() == (B,)
    health.add(A)
    assert set(health.eligible()) == {A, B}
    health.record_result(A, 200)
    assert A in health.hosts()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12),
    st.sampled_from([10.0, 25.0, 50.0, 100.0]),
    st.lists(
        st.tuples(st.integers(0, 11), st.sampled_from([200, 404, 500, 503, CONNECT_ERROR])),
        max_size=200,
    ),
    st.lists(st.integers(0, 11), max_size=3),
)
def test_ejections_never_exceed_the_cap_and_not_ready_hosts_stay_out(
    n: int, percent: float, results: list[tuple[int, int]], not_ready: list[int]
) -> None:
    hosts = [f"10.0.2.{i}:80" for i in range(n)]

    async def run() -> None:
        health, clock, _ = fleet(hosts, Outliers(consecutive_5xx=2, max_ejection_percent=percent))
        for i in not_ready:
            health.set_ready(hosts[i % n], False)
        cap = max(1, int(percent * n / 100))
        for step, (i, status) in enumerate(results):
            host = hosts[i % n]
            health.begin(host)
            health.record_result(host, status)
            if step % 10 == 0:
                await clock.advance(7)
            eligible = health.eligible()
            states = [health.state(h) for h in hosts]
            assert sum(1 for s in states if s is not None and s.ejected) <= cap
            for j in not_ready:
                assert hosts[j % n] not in eligible

    asyncio.run(run())


# ---------------------------------------------------------------------------- shared


def two_workers_health(
    active: ActiveCheck | None = None, max_hosts: int = 64
) -> tuple[HostHealth, HostHealth, ManualClock]:
    """Two workers' health over one shared table; host "a:1" is checked by worker 0,
    every other host by worker 1."""
    clock = ManualClock()
    shared = SharedHealth(max_hosts)
    out = []
    for index in (0, 1):

        def here(host: str, index: int = index) -> bool:
            return (host == "a:1") == (index == 0)

        h = HostHealth(active, Outliers(consecutive_connect_failures=3), clock, None, shared, here)
        h.set_hosts(["a:1", "b:1", "c:1"])
        out.append(h)
    return out[0], out[1], clock


async def test_an_ejection_by_one_worker_holds_in_the_others() -> None:
    w0, w1, clock = two_workers_health()
    for _ in range(3):
        w0.begin("b:1")
        w0.record_result("b:1", CONNECT_ERROR)
    assert "b:1" not in w0.eligible() and "b:1" in w1.eligible()
    assert w1.sync_shared() and w1.eligible() == ("a:1", "c:1")
    assert not w1.sync_shared()  # nothing new
    await clock.advance(30.0)  # the ejection ends in both at the same time
    assert w0.eligible() == w1.eligible() == ("a:1", "b:1", "c:1")
    assert not w1.sync_shared()  # an ejection that is over is not adopted again


async def test_each_host_is_checked_by_one_worker_and_its_verdict_holds_in_all() -> None:
    w0, w1, clock = two_workers_health(ActiveCheck(interval=1.0, unhealthy_threshold=2))
    assert w0.due_checks() == ["a:1"] and sorted(w1.due_checks()) == ["b:1", "c:1"]
    assert w0.next_check_in() == 1.0  # the others' hosts, due too, are not waited on
    for host, worker in (("a:1", w0), ("b:1", w1), ("c:1", w1)):
        worker.record_check(host, True)
    for w in (w0, w1):
        w.sync_shared()
        assert w.eligible() == ("a:1", "b:1", "c:1")
    for _ in range(2):
        await clock.advance(1.0)
        assert w0.due_checks() == ["a:1"]
        w0.record_check("a:1", False)
    assert w0.eligible() == ("b:1", "c:1")
    assert w1.sync_shared() and w1.eligible() == ("b:1", "c:1")  # w1 never checked a:1
    await clock.advance(1.0)
    w0.due_checks()
    w0.record_check("a:1", True)  # healthy again after one pass (threshold 2: two)
    await clock.advance(1.0)
    w0.due_checks()
    w0.record_check("a:1", True)
    assert w1.sync_shared() and w1.eligible() == ("a:1", "b:1", "c:1")


def test_a_host_without_a_slot_is_judged_by_each_worker_alone() -> None:
    w0, w1, _ = two_workers_health(max_hosts=1)
    for host in ("b:1", "c:1"):
        for _ in range(3):
            w0.record_result(host, CONNECT_ERROR)
    w0.outliers = Outliers(consecutive_connect_failures=3, max_ejection_percent=100.0)
    for _ in range(3):
        w0.record_result("c:1", CONNECT_ERROR)
    assert "b:1" not in w0.eligible() and "c:1" not in w0.eligible()
    w1.sync_shared()
    # one slot: the first ejected host is shared, the other stays w0's alone
    assert w1.eligible() == ("a:1", "c:1")


def test_the_table_is_shared_with_a_forked_process() -> None:
    shared = SharedHealth()
    pid = os.fork()
    if pid == 0:  # the child publishes, as a worker would
        shared.publish("x:1", 1.0, ejected_until=123.0, verdict=UNHEALTHY)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert shared.read(["x:1", "y:1"]) == {"x:1": (123.0, UNHEALTHY)}


def test_a_slot_long_unwritten_is_taken_over_by_a_new_host() -> None:
    shared = SharedHealth(max_hosts=1)
    shared.publish("old:1", 0.0, verdict=UNHEALTHY)
    shared.publish("new:1", 10.0, verdict=HEALTHY)  # the one slot is in use: not shared
    assert shared.read(["old:1", "new:1"]) == {"old:1": (0.0, UNHEALTHY)}
    shared.publish("new:1", STALE + 1.0, verdict=HEALTHY)  # old:1 gone quiet: taken over
    assert shared.read(["old:1", "new:1"]) == {"new:1": (0.0, HEALTHY)}
    # a running ejection keeps its slot however long ago it was written
    shared.publish("new:1", STALE + 2.0, ejected_until=5 * STALE)
    shared.publish("other:1", 3 * STALE, verdict=HEALTHY)
    assert shared.read(["new:1", "other:1"]) == {"new:1": (5 * STALE, HEALTHY)}


def test_owner_of_spreads_hosts_over_processes() -> None:
    hosts = [f"10.0.0.{i}:80" for i in range(200)]
    owners = Counter(owner_of(h, 2) for h in hosts)
    assert set(owners) == {0, 1} and min(owners.values()) > 60
    assert all(owner_of(h, 1) == 0 for h in hosts)
