"""Traffic split: shares within a binomial bound over 10k users, 100% stickiness, and a
canary's weight change moves only the users it must."""

from __future__ import annotations

import http.client
import http.server
import json
import math
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podkit.ambassador.split import Splitter, UserKey
from support import TinyHTTP, free_port, podkit_error, port_in_use


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


# -- the command, end to end ------------------------------------------------------------------


def test_the_split_command_keeps_users_sticky_and_takes_new_weights() -> None:
    stable = TinyHTTP(lambda _: (200, b"stable"))
    canary = TinyHTTP(lambda _: (200, b"canary"))
    stable_url, canary_url = stable.url, canary.url
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "podkit", "ambassador", "split", "--listen", f"127.0.0.1:{port}",
         "--arm", f"stable={stable_url},weight=80", "--arm", f"canary={canary_url},weight=20",
         "--sticky", "header:X-User", "--experiment", "checkout", "--admin-port", str(admin)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    conn = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/", headers={"X-User": "probe"})
                conn.getresponse().read()
                break
            except OSError:
                assert time.monotonic() < deadline, "split did not start"
                time.sleep(0.1)

        def arm_of(user: str) -> str:
            assert conn is not None
            conn.request("GET", "/", headers={"X-User": user})
            return conn.getresponse().read().decode()

        pop = users(400, 9)
        first = {u: arm_of(u) for u in pop}
        assert all(arm_of(u) == first[u] for u in pop)  # every user sticks: 100%
        in_canary = sum(a == "canary" for a in first.values())
        assert abs(in_canary - 80) <= 4 * math.sqrt(400 * 0.2 * 0.8)
        # the canary grows at run time: its users stay, some stable users join them
        weights = json.dumps({"canary": 50, "stable": 50}).encode()
        url = f"http://127.0.0.1:{admin}/weights"
        req = urllib.request.Request(url, method="PUT", data=weights)
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.load(r) == {"stable": 50.0, "canary": 50.0}
        after = {u: arm_of(u) for u in pop}
        assert all(after[u] == "canary" for u in pop if first[u] == "canary")
        assert sum(a == "canary" for a in after.values()) > in_canary
        bad = urllib.request.Request(url, method="PUT", data=b'{"blue": 1}')
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=5)
        assert info.value.code == 400 and "no arm named" in info.value.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        counted = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("podkit_ambassador_split_requests_total{")
        ]
        assert sum(counted) == 1 + 400 * 3
        assert 'podkit_ambassador_split_weight{arm="canary"} 50.0' in text
    finally:
        if conn is not None:
            conn.close()
        proc.terminate()
        proc.wait(10)
        stable.close()
        canary.close()


def test_a_port_in_use_is_a_one_line_error() -> None:
    split = ["ambassador", "split", "--arm", "a=127.0.0.1:1"]
    with port_in_use() as port:
        error = f"ambassador split: cannot listen on 127.0.0.1:{port}"
        assert podkit_error([*split, "--listen", f"127.0.0.1:{port}"]) == (
            1, f"{error} (--listen): Address already in use")  # fmt: skip
        assert podkit_error([*split, "--listen", "127.0.0.1:0", "--admin-port", str(port)]) == (
            1, f"{error} (--admin-port): Address already in use")  # fmt: skip


def test_an_arm_name_given_twice_is_refused() -> None:
    argv = ["ambassador", "split", "--arm", "a=127.0.0.1:9101,weight=1",
            "--arm", "a=127.0.0.1:9102,weight=9", "--listen", "127.0.0.1:0"]  # fmt: skip
    assert podkit_error(argv) == (
        2,
        "ambassador split: --arm 'a=127.0.0.1:9102,weight=9': arm name 'a' is given twice",
    )
