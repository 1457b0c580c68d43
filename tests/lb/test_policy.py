"""Balancing policies, without sockets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from podkit.lb.policy import (
    ConsistentHash,
    LeastRequests,
    RoundRobin,
    Upstream,
    Weighted,
    make_policy,
    parse_upstream,
)
from podkit.net.http import RequestHead


def head(*headers: tuple[bytes, bytes]) -> RequestHead:
    return RequestHead(b"GET", b"/", "1.1", list(headers))


H = head()


def ups(n: int, weights: list[int] | None = None) -> list[Upstream]:
    return [Upstream(f"10.0.0.{i + 1}", 80, (weights or [1] * n)[i]) for i in range(n)]


def test_parse_upstream() -> None:
    u = parse_upstream("http://127.0.0.1:8001")
    assert (u.host, u.port, u.weight, u.name) == ("127.0.0.1", 8001, 1, "127.0.0.1:8001")
    assert parse_upstream("127.0.0.1:9000,weight=3").weight == 3
    assert parse_upstream("http://a:1*2").weight == 2
    assert parse_upstream("backend").port == 80
    assert parse_upstream("[::1]:9000").host == "::1"
    assert parse_upstream("web-0.web.default.svc.cluster.local:80").port == 80
    bad_ones = ("https://a:1", "http://a:1/path", "a:1,w=2", "a:1,weight=0", "http://:80", "a:x")
    for bad in (*bad_ones, "foo bar", "garbage line here:80", "a..b:1", "-a:1", "a/b:1"):
        with pytest.raises(ValueError):
            parse_upstream(bad)


def test_round_robin_cycles_and_skips_unavailable() -> None:
    u = ups(3)
    rr = RoundRobin(u)
    assert [rr.pick(H, "c") for _ in range(6)] == u + u
    u[1].available = False
    assert [rr.pick(H, "c") for _ in range(4)] == [u[0], u[2], u[0], u[2]]
    assert rr.pick(H, "c", exclude={u[0]}) is u[2]
    for x in u:
        x.available = False
    assert rr.pick(H, "c") is None


def test_weighted_is_smooth_and_proportional() -> None:
    u = ups(3, [5, 1, 1])
    w = Weighted(u)
    picks = [w.pick(H, "c") for _ in range(7)]
    assert Counter(picks) == {u[0]: 5, u[1]: 1, u[2]: 1}
    # smooth: the heavy one never gets more than 3 in a row (nginx's sequence a a b a c a a)
    names = "".join("abc"[u.index(p)] for p in picks if p is not None)
    assert "aaaa" not in names
    picks = [w.pick(H, "c") for _ in range(7000)]
    assert Counter(picks) == {u[0]: 5000, u[1]: 1000, u[2]: 1000}


def test_make_policy_round_robin_with_weights_is_weighted() -> None:
    assert isinstance(make_policy("round-robin", ups(2, [2, 1])), Weighted)
    assert isinstance(make_policy("round-robin", ups(2)), RoundRobin)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random", ups(2))


def test_least_requests_prefers_the_idle_upstream() -> None:
    u = ups(4)
    lr = LeastRequests(u, rng=random.Random(7))
    u[0].inflight = 50
    u[1].inflight = 50
    u[2].inflight = 50
    counts: Counter[Upstream] = Counter()
    for _ in range(1000):
        p = lr.pick(H, "c")
        assert p is not None
        counts[p] += 1
    # u[3] wins every comparison it is part of (about half of all picks with 4 upstreams)
    assert counts[u[3]] > 400
    assert all(counts[x] < counts[u[3]] for x in u[:3])


def test_least_requests_balances_in_flight_requests() -> None:
    u = ups(5)
    lr = LeastRequests(u, rng=random.Random(1))
    for _ in range(1000):
        p = lr.pick(H, "c")
        assert p is not None
        p.inflight += 1
    loads = [x.inflight for x in u]
    assert max(loads) - min(loads) <= 3  # power of two choices keeps the spread tiny


@pytest.mark.parametrize(("weights", "share_of_last"), [([1, 1], 1 / 2), ([1, 2], 2 / 3)])
def test_least_requests_ties_go_by_weight_not_by_order(
    weights: list[int], share_of_last: float
) -> None:
    """Sequential requests (nothing in flight: every comparison a tie) over two
    upstreams: the second gets its weight's share, not none of them."""
    u = ups(2, weights)
    lr = LeastRequests(u, rng=random.Random(3))
    n = 3000
    last = sum(lr.pick(H, "c") is u[1] for _ in range(n))
    sd = (n * share_of_last * (1 - share_of_last)) ** 0.5
    assert abs(last - n * share_of_last) < 4 * sd


def test_least_requests_respects_availability_and_exclusion() -> None:
    u = ups(3)
    lr = LeastRequests(u)
    u[0].available = False
    for _ in range(50):
        assert lr.pick(H, "c", exclude={u[1]}) is u[2]
    u[2].available = False
    assert lr.pick(H, "c", exclude={u[1]}) is None


def test_consistent_hash_is_sticky_by_header_cookie_or_ip() -> None:
    u = ups(5)
    ch = ConsistentHash(u, "header:X-User")
    first = ch.pick(head((b"X-User", b"alice")), "1.1.1.1")
    for ip in ("2.2.2.2", "3.3.3.3"):
        assert ch.pick(head((b"x-user", b"alice")), ip) is first
    cookie = ConsistentHash(u, "cookie:session")
    a = cookie.pick(head((b"Cookie", b"theme=dark; session=abc123")), "1.1.1.1")
    assert cookie.pick(head((b"Cookie", b"session=abc123")), "9.9.9.9") is a
    by_ip = ConsistentHash(u, "ip")
    assert by_ip.pick(H, "10.1.2.3") is by_ip.pick(head((b"X-User", b"z")), "10.1.2.3")
    # no header: the client address decides
    assert ch.pick(H, "10.1.2.3") is by_ip.pick(H, "10.1.2.3")
    with pytest.raises(ValueError):
        ConsistentHash(u, "header:")
    with pytest.raises(ValueError):
        ConsistentHash(u, "query:x")


def test_consistent_hash_spreads_keys_evenly() -> None:
    u = ups(4)
    ch = ConsistentHash(u, "ip")
    counts = Counter(ch.owner(b"key-%d" % i) for i in range(20_000))
    assert all(3_500 < counts[x] < 6_500 for x in u), counts


def test_a_replica_that_leaves_moves_only_its_own_keys() -> None:
    u = ups(5)
    keys = [b"session-%d" % i for i in range(5_000)]
    ring = ConsistentHash(u)
    before = {k: ring.owner(k) for k in keys}
    leaving = u[2]
    ring.set_upstreams([x for x in u if x is not leaving])
    after = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if before[k] is not after[k]]
    assert moved and all(before[k] is leaving for k in moved)
    assert len(moved) == sum(1 for k in keys if before[k] is leaving)
    # it comes back: its keys return to it, and nothing else moves
    ring.set_upstreams(u)
    assert {k: ring.owner(k) for k in keys} == before


def test_an_unavailable_replica_lends_its_keys_and_gets_them_back() -> None:
    u = ups(4)
    keys = [b"k%d" % i for i in range(2_000)]
    ring = ConsistentHash(u)
    before = {k: ring.owner(k) for k in keys}
    u[1].available = False
    during = {k: ring.owner(k) for k in keys}
    assert all(during[k] is before[k] for k in keys if before[k] is not u[1])
    assert all(during[k] is not u[1] for k in keys)
    u[1].available = True
    assert {k: ring.owner(k) for k in keys} == before


def test_a_joining_replica_takes_keys_only_for_itself() -> None:
    u = ups(4)
    keys = [b"k%d" % i for i in range(4_000)]
    ring = ConsistentHash(u[:3])
    before = {k: ring.owner(k) for k in keys}
    ring.set_upstreams(u)
    after = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if before[k] is not after[k]]
    assert all(after[k] is u[3] for k in moved)
    assert 600 < len(moved) < 1_400  # about a quarter


def test_weights_on_the_ring() -> None:
    u = ups(2, [3, 1])
    ring = ConsistentHash(u)
    counts = Counter(ring.owner(b"w%d" % i) for i in range(20_000))
    assert 2.2 < counts[u[0]] / counts[u[1]] < 4.0


def test_the_log_names_the_policy_in_effect() -> None:
    """round-robin over weighted upstreams is the weighted policy, and says so."""
    import subprocess
    import sys

    from support import free_port

    proc = subprocess.Popen(
        [sys.executable, "-m", "podkit", "lb", "--listen", f"127.0.0.1:{free_port()}",
         "--upstream", "127.0.0.1:1", "--upstream", "127.0.0.1:2,weight=2"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "(1 worker, weighted) -> 127.0.0.1:1, 127.0.0.1:2" in line, line
    finally:
        proc.terminate()
        proc.wait(10)
