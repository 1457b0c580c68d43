"""The per-request pipeline: where caching, rate limits, breakers and health plug in.

The proxy calls each `Filter` it was given, in order, at four points of an exchange:

1. `on_request(ex)` once the request head is read, before an upstream is chosen. Return
   complete response bytes to answer locally (a rate limit's 429, a cache hit), None to
   go on, or an awaitable of either when the filter must wait (a request coalesced onto
   a cache fill in progress): the proxy awaits it in a task, then answers or goes on
   with the next filter. `ex.head` is the request, `ex.client_address` the client's IP.
2. `admit(ex, upstream)` after the policy chose `upstream`. False means "not this one"
   (a circuit breaker over its limits): the proxy asks the policy again without it, and
   answers 503 when no upstream admits the request.
3. `on_response(ex, head)` when the upstream's response head arrives, before it is sent:
   a filter may append to `head.headers` (a cache's `X-Cache: MISS`). Return a
   `BodyObserver` to see the body as it streams to the client (a cache storing it), or
   None. Every filter is called; the first observer returned is used.
4. `on_done(ex, upstream, status, error)` when the exchange with `upstream` ends: `status`
   is the upstream's status (None when it failed), `error` a short reason when it failed
   (connect refused, reset, timeout). Passive health, outlier ejection and breaker
   releases go here. It is called once per try, so a retried request reports each try.

With no filters the proxy skips all of this: the hot path pays one truth test. A filter
whose `on_response` is BaseFilter's (or that sets `observes_responses = False`) leaves
whole answers of one read on the fast path, where they are passed through unparsed;
`on_done` still runs for every try. A filter that reads answers may waive one exchange's
in `on_request` with `ex.waive_response(lines)` (a cache's pass): when every such filter
waived it, the answer may take the fast path too, with `lines` added to its head (on
the full path they are added as well, and `on_response` is still called).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from podkit.net.http import ResponseHead
    from podkit.net.proxy.exchange import Exchange
    from podkit.net.proxy.upstream import Upstream


class BodyObserver(Protocol):
    def feed(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def abort(self) -> None: ...


class Filter(Protocol):
    def on_request(self, ex: Exchange) -> bytes | Awaitable[bytes | None] | None: ...

    def admit(self, ex: Exchange, upstream: Upstream) -> bool: ...

    def on_response(self, ex: Exchange, head: ResponseHead) -> BodyObserver | None: ...

    def on_done(
        self, ex: Exchange, upstream: Upstream, status: int | None, error: str | None
    ) -> None: ...


def observes_responses(f: object) -> bool:
    """Whether the proxy must parse responses to call `f.on_response`."""
    flag = getattr(f, "observes_responses", None)
    if flag is not None:
        return bool(flag)
    return getattr(type(f), "on_response", None) is not BaseFilter.on_response


class BaseFilter:
    """A filter that does nothing; subclass and override what you need."""

    def on_request(self, ex: Exchange) -> bytes | Awaitable[bytes | None] | None:
        return None

    def admit(self, ex: Exchange, upstream: Upstream) -> bool:
        return True

    def on_response(self, ex: Exchange, head: ResponseHead) -> BodyObserver | None:
        return None

    def on_done(
        self, ex: Exchange, upstream: Upstream, status: int | None, error: str | None
    ) -> None:
        return None
