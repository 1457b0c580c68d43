"""The engine's decisions as functions of state, without sockets: whether and when a
failed try is sent again (`retry.may_retry`, `retry.retry_wait`), and which upstream a
try goes to (`upstream.choose`)."""

from __future__ import annotations

from podkit.net.http import RequestHead
from podkit.net.proxy.retry import may_retry, retry_backoff, retry_wait
from podkit.net.proxy.upstream import RoundRobin, Upstream, choose

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
