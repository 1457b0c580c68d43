"""The engine's decisions as functions of state, without sockets: which timeout is due
(`timeouts.timeout_verdict`), what state a connection is in (`states.state_of`), whether
and when a failed try is sent again (`retry.may_retry`, `retry.retry_wait`), and which
upstream a try goes to (`upstream.choose`).

Every timeout is a different number of seconds, so a verdict taken on the wrong one
fails, and each is checked at its limit (nothing due) and just past it."""

from __future__ import annotations

import pytest

from podkit.net.http import RequestHead
from podkit.net.proxy.config import ProxyConfig
from podkit.net.proxy.retry import may_retry, retry_backoff, retry_wait
from podkit.net.proxy.states import State, state_of
from podkit.net.proxy.timeouts import Timing, Verdict, timeout_verdict
from podkit.net.proxy.upstream import RoundRobin, Upstream, choose

CFG = ProxyConfig(
    upstreams=[],
    header_timeout=10.0,
    send_timeout=20.0,
    body_timeout=30.0,
    upstream_timeout=40.0,
    request_timeout=50.0,
    idle_timeout=60.0,
    tunnel_timeout=70.0,
)
T0 = 1000.0  # when the last thing happened, in each test
PAST = 0.01  # just past a limit
LONG_AGO = 1.0  # long before anything of interest


def verdict(state: State, now: float, **fields: float | int | bool | None) -> Verdict:
    return timeout_verdict(Timing(state, **fields), now, CFG)


def at_and_past(state: State, limit: float, **fields: float | int | bool | None) -> list[Verdict]:
    """The verdicts at T0 + limit and just after it."""
    return [verdict(state, T0 + limit, **fields), verdict(state, T0 + limit + PAST, **fields)]


# --- timeouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", [s for s in State if s is not State.CLOSED])
def test_a_client_that_takes_nothing_it_is_sent_is_cut_off_in_every_state(state: State) -> None:
    fresh = {"quiet": T0 + 20, "peer_quiet": T0 + 20, "head_since": T0 + 20, "started": T0 + 20}
    assert at_and_past(state, 20, unsent=1, unsent_since=T0, **fresh) == [
        Verdict.KEEP,
        Verdict.SEND_STALLED,
    ]


def test_nothing_unsent_is_no_stall_and_a_closed_connection_has_nothing_due() -> None:
    assert verdict(State.LINGERING, T0 + 1e6, unsent=0, unsent_since=LONG_AGO) is Verdict.KEEP
    assert verdict(State.CLOSED, T0 + 1e6, unsent=5, unsent_since=LONG_AGO) is Verdict.KEEP


def test_a_lingering_connection_waits_for_its_own_close() -> None:
    assert verdict(State.LINGERING, T0 + 1e6, quiet=LONG_AGO, peer_quiet=LONG_AGO) is Verdict.KEEP


def test_a_tunnel_ends_when_neither_side_has_spoken_for_the_tunnel_timeout() -> None:
    # the later of the two sides counts, whichever it is
    for quiet, peer in ((T0, LONG_AGO), (LONG_AGO, T0), (T0, T0)):
        assert at_and_past(State.TUNNEL, 70, quiet=quiet, peer_quiet=peer) == [
            Verdict.KEEP,
            Verdict.TUNNEL_IDLE,
        ]
    assert at_and_past(State.TUNNEL, 70, quiet=T0) == [Verdict.KEEP, Verdict.TUNNEL_IDLE]


def test_a_head_must_be_complete_within_the_header_timeout_of_its_start() -> None:
    assert at_and_past(State.READING_HEAD, 10, quiet=T0 + 10, head_since=T0) == [
        Verdict.KEEP,
        Verdict.HEAD_TIMEOUT,
    ]
    # its start not seen yet: nothing is due, however quiet the client
    assert verdict(State.READING_HEAD, T0 + 1e6, quiet=LONG_AGO) is Verdict.KEEP


def test_a_keep_alive_connection_closes_after_the_idle_timeout() -> None:
    assert at_and_past(State.IDLE, 60, quiet=T0) == [Verdict.KEEP, Verdict.IDLE_TIMEOUT]


def test_the_request_timeout_counts_from_the_first_try_of_a_complete_request() -> None:
    fields = {"quiet": T0, "started": T0, "tries": 1, "peer_quiet": T0 + 50}
    assert at_and_past(State.WAITING_UPSTREAM, 50, **fields) == [
        Verdict.KEEP,
        Verdict.REQUEST_TIMEOUT,
    ]
    late = T0 + 1e6
    recent = {"quiet": late, "peer_quiet": late, "started": LONG_AGO}
    # no try sent yet (a filter waits), an answer under way, the body still coming
    assert verdict(State.WAITING_UPSTREAM, late, tries=0, **recent) is Verdict.KEEP
    assert verdict(State.STREAMING, late, tries=1, responded=True, **recent) is Verdict.KEEP
    assert verdict(State.READING_BODY, late, tries=1, **recent) is Verdict.KEEP


def test_a_request_timeout_of_zero_is_none() -> None:
    cfg = ProxyConfig(upstreams=[], request_timeout=0.0)
    t = Timing(State.WAITING_UPSTREAM, quiet=T0, started=LONG_AGO, tries=1, peer_quiet=T0)
    assert timeout_verdict(t, T0 + 1, cfg) is Verdict.KEEP


def test_a_request_body_that_stalls_for_the_body_timeout_is_answered_408_or_cut() -> None:
    assert at_and_past(State.READING_BODY, 30, quiet=T0) == [Verdict.KEEP, Verdict.BODY_STALLED]
    assert at_and_past(State.READING_BODY, 30, quiet=T0, responded=True) == [
        Verdict.KEEP,
        Verdict.BODY_STALLED_ANSWERED,
    ]
    # the body is read: a quiet client is waiting for its answer, not stalling
    assert verdict(State.WAITING_UPSTREAM, T0 + 31, quiet=T0) is Verdict.KEEP


@pytest.mark.parametrize("state", [State.READING_BODY, State.WAITING_UPSTREAM, State.STREAMING])
def test_an_upstream_quiet_for_the_upstream_timeout_ends_the_try(state: State) -> None:
    fields = {"quiet": T0 + 40, "peer_quiet": T0}
    assert at_and_past(state, 40, **fields) == [Verdict.KEEP, Verdict.UPSTREAM_TIMEOUT]
    # no upstream connection yet (connecting, waiting to retry): nothing to time
    assert verdict(state, T0 + 1e6, quiet=T0 + 1e6) is Verdict.KEEP


def test_the_first_rule_that_applies_wins() -> None:
    everything_late = {
        "quiet": LONG_AGO,
        "peer_quiet": LONG_AGO,
        "started": LONG_AGO,
        "tries": 1,
        "unsent": 1,
        "unsent_since": LONG_AGO,
    }
    now = T0 + 1e6
    assert verdict(State.WAITING_UPSTREAM, now, **everything_late) is Verdict.SEND_STALLED
    del everything_late["unsent"]
    assert verdict(State.WAITING_UPSTREAM, now, **everything_late) is Verdict.REQUEST_TIMEOUT
    assert verdict(State.READING_BODY, now, **everything_late) is Verdict.BODY_STALLED
    assert verdict(State.STREAMING, now, **everything_late) is Verdict.UPSTREAM_TIMEOUT


# --- states -----------------------------------------------------------------------------


def test_the_state_is_read_off_the_connection_fields() -> None:
    base = {"closed": False, "lingering": False, "tunnel": False, "answering": False}
    assert state_of(**base) is State.IDLE
    assert state_of(**base, in_head=True) is State.READING_HEAD
    answering = {**base, "answering": True, "in_head": True}  # a pipelined head counts not
    assert state_of(**answering) is State.READING_BODY
    assert state_of(**answering, responded=True) is State.READING_BODY
    assert state_of(**answering, request_done=True) is State.WAITING_UPSTREAM
    assert state_of(**answering, request_done=True, responded=True) is State.STREAMING
    assert state_of(**{**answering, "tunnel": True}) is State.TUNNEL
    assert state_of(**{**answering, "tunnel": True, "lingering": True}) is State.LINGERING
    assert state_of(**{**answering, "lingering": True, "closed": True}) is State.CLOSED


# --- retries ----------------------------------------------------------------------------


def head(method: bytes = b"GET", *, body: bool = False, **more: bytes) -> RequestHead:
    headers = [(b"Host", b"x"), *((k.replace("_", "-").encode(), v) for k, v in more.items())]
    upgrade = more.get("upgrade")
    length = 5 if body else None
    return RequestHead(method, b"/", "1.1", headers, content_length=length, upgrade=upgrade)


def retry(h: RequestHead, tries: int = 1, **flags: bool) -> bool:
    options = {"nothing_sent": False, "body_kept": False, **flags}
    return may_retry(h, tries=tries, max_tries=3, **options)


def test_an_idempotent_request_is_retried_until_its_tries_are_spent() -> None:
    assert retry(head(b"GET"), tries=2)
    assert not retry(head(b"GET"), tries=3)
    assert not retry(head(b"GET"), closing=True)


def test_a_request_that_is_not_idempotent_is_retried_only_when_the_client_allows_it() -> None:
    assert not retry(head(b"POST"))
    assert retry(head(b"POST", x_podkit_retry=b"1"))
    assert not retry(head(b"POST", x_podkit_retry=b"0"))


def test_a_request_with_a_body_is_retried_only_when_all_of_it_was_kept() -> None:
    assert retry(head(b"PUT", body=True), body_kept=True)
    assert not retry(head(b"PUT", body=True), body_kept=False)


def test_a_try_that_reached_no_upstream_is_always_sent_again_while_tries_remain() -> None:
    for h in (head(b"POST", body=True), head(b"GET", upgrade=b"websocket")):
        assert retry(h, nothing_sent=True, retry=False)
        assert not retry(h, tries=3, nothing_sent=True)


def test_an_upgrade_or_an_invalid_answer_is_never_sent_again() -> None:
    assert not retry(head(b"GET", upgrade=b"websocket"))
    assert not retry(head(b"GET"), retry=False)


def test_a_retry_goes_at_once_while_an_available_upstream_is_untried() -> None:
    a, b, c = (Upstream("127.0.0.1", p) for p in (1, 2, 3))
    assert retry_wait([a, b, c], {a}, 1, 0.5) == 0.0
    c.available = False
    assert retry_wait([a, b, c], {a, b}, 2, 0.5) == retry_backoff(2, 0.5) > 0
    assert retry_wait([a, b, c], {a, b}, 3, 0.5) == retry_backoff(3, 0.5)


# --- upstream choice --------------------------------------------------------------------


class Refuse:
    def __init__(self, *refused: Upstream) -> None:
        self.refused = set(refused)
        self.asked: list[Upstream] = []

    def admits(self, upstream: Upstream) -> bool:
        self.asked.append(upstream)
        return upstream not in self.refused


def test_a_try_goes_to_an_upstream_not_tried_yet_then_to_any_once_all_were() -> None:
    a, b, c = ups = [Upstream("127.0.0.1", p) for p in (1, 2, 3)]
    h = head()
    assert choose(RoundRobin(ups), h, "c") is a
    assert choose(RoundRobin(ups), h, "c", {a}) is b
    assert choose(RoundRobin(ups), h, "c", {a, b}) is c
    assert choose(RoundRobin(ups), h, "c", {a, b, c}) is a  # afresh
    c.available = False
    assert choose(RoundRobin(ups), h, "c", {a, b}) is a


def test_a_refused_upstream_is_passed_over_and_all_refused_is_none() -> None:
    a, b, c = ups = [Upstream("127.0.0.1", p) for p in (1, 2, 3)]
    h = head()
    judge = Refuse(a)
    assert choose(RoundRobin(ups), h, "c", None, judge) is b
    assert judge.asked == [a, b]
    assert choose(RoundRobin(ups), h, "c", {b}, Refuse(a)) is c
    assert choose(RoundRobin(ups), h, "c", {b}, Refuse(a, c)) is None
    assert choose(RoundRobin(ups), h, "c", None, Refuse(a, b, c)) is None
    assert choose(RoundRobin([]), h, "c", None, Refuse()) is None
