"""When the proxy engine may send a failed try again, and how many retries it may send.

- `is_retryable(method, headers) -> bool`: idempotent methods (GET, HEAD, OPTIONS, PUT,
  DELETE, TRACE), or the client sent `x-podkit-retry: 1` (also true/yes).
- `RetryRate(percent=20.0, per_second=10.0, window=10.0)`: `observe(now, tries)`,
  `allow(now, tries) -> bool`, `exempt()`; counters `allowed`, `refused`, `exempted`.
  The engine keeps one per worker, always on: retries add at most `percent` to the
  requests of the last window, plus `per_second`.
- `retry_backoff(tries, draw) -> float`: the jittered wait before a retry to an upstream
  already tried.
- `may_retry(head, ...) -> bool`: whether a failed try may be sent again, the budget
  aside; `retry_wait(upstreams, tried, tries, draw) -> float`: when (0: at once).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from podkit.net.http import RequestHead
    from podkit.net.proxy.upstream import Upstream

IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
RETRY_HEADER: Final = b"x-podkit-retry"
BACKOFF_BASE: Final = 0.025  # a retry to an upstream already tried waits about this, doubling
BACKOFF_MAX: Final = 0.25


def retry_backoff(tries: int, draw: float) -> float:
    """Seconds to wait after `tries` tries before a retry to an upstream already tried:
    `BACKOFF_BASE * 2**(tries - 1)`, capped at `BACKOFF_MAX`, then between half and all
    of it (`draw` in [0, 1) picks where)."""
    ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** max(0, tries - 1))
    return ceiling * (0.5 + 0.5 * draw)


class RetryRate:
    """Retries as a share of the requests of the last `window` seconds: every request sent
    earns `percent` / 100 of a retry, every retry spends one, and `per_second` retries a
    second are allowed besides, so that a quiet balancer can still retry. Earnings older
    than the window expire, so a long healthy spell banks no storm of retries.

    The owner reports its running count of tries with `observe(now, tries)` now and then
    (each sweep); `allow(now, tries)` decides a retry and counts it; `exempt()` counts a
    retry outside the budget (of a try that reached no upstream), so that it is not taken
    for a first try."""

    def __init__(
        self, percent: float = 20.0, per_second: float = 10.0, window: float = 10.0
    ) -> None:
        if percent < 0 or per_second < 0 or window <= 0:
            raise ValueError("retry budget: percent and per_second >= 0, window > 0")
        self.ratio = percent / 100.0
        self.per_second = per_second
        self.window = window
        self.allowed = 0  # retries allowed, in all
        self.refused = 0  # retries refused, in all
        self.exempted = 0  # retries outside the budget, in all
        self._marks: deque[tuple[float, int, int]] = deque()  # (time, requests, allowed)

    def exempt(self) -> None:
        self.exempted += 1

    def observe(self, now: float, tries: int) -> None:
        marks = self._marks
        marks.append((now, tries - self.exempted, self.allowed))
        while len(marks) > 1 and marks[1][0] <= now - self.window:
            marks.popleft()  # keep one mark at or before the window's start

    def allow(self, now: float, tries: int) -> bool:
        """Whether one more retry fits the budget; counted when it does."""
        requests = tries - self.exempted
        marks = self._marks
        if marks:
            since, base_requests, base_allowed = marks[0]
            span = min(now - since, self.window)
        else:
            since, base_requests, base_allowed, span = now, requests, self.allowed, 0.0
        retries = self.allowed - base_allowed
        firsts = max(0, requests - base_requests - retries)  # tries that were not retries
        if retries + 1 <= firsts * self.ratio + max(span, 1.0) * self.per_second:
            self.allowed += 1
            return True
        self.refused += 1
        return False


def is_retryable(method: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a failed try may be sent again: an idempotent method or x-podkit-retry: 1."""
    if method in IDEMPOTENT_METHODS:
        return True
    size = len(RETRY_HEADER)
    for k, v in headers:
        if len(k) == size and k.lower() == RETRY_HEADER:
            return v.strip().lower() in (b"1", b"true", b"yes")
    return False


def may_retry(
    head: RequestHead,
    *,
    tries: int,
    max_tries: int,
    nothing_sent: bool,
    body_kept: bool,
    retry: bool = True,
    closing: bool = False,
) -> bool:
    """Whether a failed try may be sent again, the retry budget aside: never past
    `max_tries` tries or while the proxy is closing; always when the try reached no
    upstream (`nothing_sent`); else only when `retry` (False: the upstream ran the request
    and answered wrongly), not for an Upgrade, and for a request with a body only when
    all of it was kept to send again (`body_kept`), without one when `is_retryable`."""
    if tries >= max_tries or closing:
        return False
    if nothing_sent:
        return True
    if not retry or head.upgrade is not None:
        return False
    return body_kept if head.has_body else is_retryable(head.method, head.headers)


def retry_wait(
    upstreams: Iterable[Upstream], tried: set[Upstream], tries: int, draw: float
) -> float:
    """Seconds before a retry: none while an available upstream is left untried, else the
    back-off (`retry_backoff`), so that a restarting upstream has time to come back."""
    if any(u.available and u not in tried for u in upstreams):
        return 0.0
    return retry_backoff(tries, draw)
