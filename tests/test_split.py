"""Traffic split: shares within a binomial bound over 10k users, 100% stickiness, and a
canary's weight change moves only the users it must."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podkit.ambassador.split import Splitter, UserKey


def users(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"user-{rng.getrandbits(64):016x}" for _ in range(n)]


@pytest.mark.parametrize(
    "weights", [{"stable": 90, "canary": 10}, {"a": 1, "b": 1}, {"a": 5, "b": 3, "c": 2}]
)
def test_shares_are_within_a_binomial_bound_over_10k_users(weights: dict[str, int]) -> None:
    n = 10_000
    s = Splitter.from_weights("checkout-v2", weights)
    counts = dict.fromkeys(weights, 0)
    for u in users(n, 1):
        counts[s.choose(u).name] += 1
    total = sum(weights.values())
    for arm, w in weights.items():
        p = w / total
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[arm] - n * p) <= 4 * sd, (arm, counts, n * p, sd)  # 4 sigma


def test_every_user_stays_in_one_arm() -> None:
    s = Splitter.from_weights("exp", {"stable": 80, "canary": 20})
    first = {u: s.choose(u).name for u in users(10_000, 2)}
    for _ in range(3):
        assert all(s.choose(u).name == arm for u, arm in first.items())  # 100% sticky
    assert s.arms[0].requests + s.arms[1].requests == 40_000


def test_raising_the_canary_only_moves_users_into_it() -> None:
    s = Splitter.from_weights("exp", {"stable": 90, "canary": 10})
    pop = users(10_000, 3)
    before = {u: s.choose(u).name for u in pop}
    s.set_weights({"canary": 30, "stable": 70})
    after = {u: s.choose(u).name for u in pop}
    moved = [(before[u], after[u]) for u in pop if before[u] != after[u]]
    assert moved and all(m == ("stable", "canary") for m in moved)
    assert all(after[u] == "canary" for u in pop if before[u] == "canary")
    # about 20% of users had to move, no more
    assert abs(len(moved) - 2_000) <= 4 * math.sqrt(10_000 * 0.2 * 0.8)
    s.set_weights({"canary": 0})
    assert all(s.choose(u).name == "stable" for u in pop)  # canary off: everyone back


def test_experiments_shuffle_users_independently() -> None:
    a = Splitter.from_weights("exp-a", {"x": 1, "y": 1})
    b = Splitter.from_weights("exp-b", {"x": 1, "y": 1})
    pop = users(10_000, 4)
    same = sum(a.choose(u).name == b.choose(u).name for u in pop)
    assert abs(same - 5_000) <= 4 * 50  # independent: agree half the time


def test_bad_weights_are_refused_and_change_nothing() -> None:
    s = Splitter.from_weights("exp", {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="no arm named"):
        s.set_weights({"c": 1})
    with pytest.raises(ValueError, match="positive weight"):
        s.set_weights({"a": 0, "b": 0})
    with pytest.raises(ValueError, match="negative"):
        s.set_weights({"a": -1})
    assert s.weights() == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="distinct names"):
        Splitter.from_weights("exp", {})


def test_user_keys_from_header_cookie_and_ip() -> None:
    headers = [(b"Host", b"shop"), (b"X-User", b" u42 "), (b"Cookie", b"theme=dark; uid=abc")]
    assert UserKey.parse("header:X-User").read(headers, "10.0.0.1") == "u42"
    assert UserKey.parse("cookie:uid").read(headers, "10.0.0.1") == "abc"
    assert UserKey.parse("cookie:none").read(headers, "10.0.0.1") is None
    assert UserKey.parse("ip").read(headers, "10.0.0.1") == "10.0.0.1"
    for bad in ("header:", "cookies:x", "ip:1", ""):
        with pytest.raises(ValueError, match="sticky key"):
            UserKey.parse(bad)


@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=60)), max_size=8))
def test_reading_keys_from_arbitrary_headers_never_fails(
    headers: list[tuple[bytes, bytes]],
) -> None:
    for spec in ("header:x-user", "cookie:uid", "ip"):
        key = UserKey.parse(spec).read(headers, "1.2.3.4")
        assert key is None or isinstance(key, str)
