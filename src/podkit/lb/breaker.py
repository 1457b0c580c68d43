"""Circuit breaking and retries for one upstream, sans-IO: admission, budgets, timeouts.

    breaker = Breaker(Limits(max_requests=1024), RetryBudget(percent=20, min_concurrency=3))
    policy = RetryPolicy(max_retries=2, per_try_timeout=2.0, timeout=15.0)

    ticket = breaker.admit_request()
    if isinstance(ticket, Refusal):      # over a limit: answer 503 at once
        ...
    retryable = is_retryable(method, headers)
    started, attempt = clock.now(), 0
    while True:
        try:                             # a timeout of <= 0: the deadline passed, answer 504
            status = await send(timeout=policy.try_timeout(started, clock.now()))
        finally:
            ticket.release()
        delay = policy.retry_delay(attempt, status, started, clock.now()) if retryable else None
        if delay is None or isinstance(ticket := breaker.admit_retry(), Refusal):
            break                        # answer with this try's outcome
        attempt += 1
        await clock.sleep(delay)

API:
- `Limits(max_connections=1024, max_pending=1024, max_requests=1024)`;
  `RetryBudget(percent=20.0, min_concurrency=3)`.
- `Breaker(limits=Limits(), budget=RetryBudget())`: `admit_request()`, `admit_retry()`,
  `admit_pending()`, `admit_connection()`, each `-> Ticket | Refusal`; `Ticket.release()`
  (idempotent); gauges `connections`, `pending`, `requests`, `retries`; counter
  `overflows` by reason.
- `Refusal.reason`: "connections", "pending", "requests" or "retries"; the Refusal
  objects are constants (no allocation on the refusal path).
- `is_retryable(method, headers) -> bool`: idempotent methods (GET, HEAD, OPTIONS, PUT,
  DELETE, TRACE), or the client sent `x-podkit-retry: 1` (also true/yes).
- `RetryPolicy(max_retries=2, per_try_timeout=None, timeout=15.0, retry_on=RETRY_ON,
  backoff_base=0.025, backoff_max=0.25)`: `try_timeout(started, now) -> float` (seconds
  for the next try, <= 0 when the overall timeout is spent),
  `retry_delay(attempt, status, started, now, rng=None) -> float | None`.
  `RETRY_ON` is connect errors (status 0), 502, 503 and 504.

- `RetryRate(percent=20.0, per_second=10.0, window=10.0)`: `observe(now, tries)`,
  `allow(now, tries) -> bool`, `exempt()`; counters `allowed`, `refused`, `exempted`.
  The proxy keeps one per worker, always on: retries add at most `percent` to the
  requests of the last window, plus `per_second`.

A retry is admitted by `Breaker.admit_retry` when, counting it, the retries in flight
stay within `percent` of the requests in flight (retries included), or within
`min_concurrency`; and when `max_requests` allows one more request.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
RETRY_HEADER: Final = b"x-podkit-retry"
RETRY_ON: Final = frozenset({0, 502, 503, 504})  # 0: no response (refused, reset, timed out)
Reason = Literal["connections", "pending", "requests", "retries"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Most connections, requests waiting for a connection, and requests in flight."""

    max_connections: int = 1024
    max_pending: int = 1024
    max_requests: int = 1024


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Retries in flight allowed as a share of requests in flight, with a floor."""

    percent: float = 20.0
    min_concurrency: int = 3


class Refusal:
    """Over a limit: the proxy answers 503 without trying the upstream."""

    __slots__ = ("reason",)

    def __init__(self, reason: Reason) -> None:
        self.reason: Reason = reason

    def __repr__(self) -> str:
        return f"Refusal({self.reason!r})"


REFUSED: Final[dict[Reason, Refusal]] = {
    r: Refusal(r) for r in ("connections", "pending", "requests", "retries")
}


class Ticket:
    """An admitted connection, pending request, request or retry; release it when done."""

    __slots__ = ("_breaker", "_kind")

    def __init__(self, breaker: Breaker, kind: Reason) -> None:
        self._breaker: Breaker | None = breaker
        self._kind: Reason = kind

    def release(self) -> None:
        """Give the slot back; calling it again does nothing."""
        breaker = self._breaker
        if breaker is None:
            return
        self._breaker = None
        kind = self._kind
        if kind == "requests":
            breaker.requests -= 1
        elif kind == "retries":
            breaker.requests -= 1
            breaker.retries -= 1
        elif kind == "pending":
            breaker.pending -= 1
        else:
            breaker.connections -= 1

    @property
    def released(self) -> bool:
        return self._breaker is None


class Breaker:
    """The circuit breaker of one upstream: counts in flight against fixed limits."""

    def __init__(self, limits: Limits | None = None, budget: RetryBudget | None = None) -> None:
        self.limits = limits or Limits()
        self.budget = budget or RetryBudget()
        self.connections = 0
        self.pending = 0
        self.requests = 0  # requests in flight, retries included
        self.retries = 0  # retries in flight
        self.overflows: dict[Reason, int] = dict.fromkeys(REFUSED, 0)

    def admit_request(self) -> Ticket | Refusal:
        """A first try of a request."""
        if self.requests >= self.limits.max_requests:
            return self._refuse("requests")
        self.requests += 1
        return Ticket(self, "requests")

    def admit_retry(self) -> Ticket | Refusal:
        """A retry: within the retry budget and the request limit."""
        budget = self.budget
        if self.retries >= budget.min_concurrency and (self.retries + 1) * 100 > budget.percent * (
            self.requests + 1
        ):
            return self._refuse("retries")
        if self.requests >= self.limits.max_requests:
            return self._refuse("requests")
        self.requests += 1
        self.retries += 1
        return Ticket(self, "retries")

    def admit_pending(self) -> Ticket | Refusal:
        """A request waiting for a connection to the upstream."""
        if self.pending >= self.limits.max_pending:
            return self._refuse("pending")
        self.pending += 1
        return Ticket(self, "pending")

    def admit_connection(self) -> Ticket | Refusal:
        """A new connection to the upstream."""
        if self.connections >= self.limits.max_connections:
            return self._refuse("connections")
        self.connections += 1
        return Ticket(self, "connections")

    def _refuse(self, reason: Reason) -> Refusal:
        self.overflows[reason] += 1
        return REFUSED[reason]


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


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many retries, on which outcomes, with which timeouts and back-off."""

    max_retries: int = 2
    per_try_timeout: float | None = None
    timeout: float = 15.0
    retry_on: frozenset[int] = field(default=RETRY_ON)
    backoff_base: float = 0.025
    backoff_max: float = 0.25

    def try_timeout(self, started: float, now: float) -> float:
        """Seconds the next try may take: the per-try timeout within the overall deadline."""
        left = started + self.timeout - now
        per_try = self.per_try_timeout
        return left if per_try is None or per_try > left else per_try

    def retry_delay(
        self,
        attempt: int,
        status: int,
        started: float,
        now: float,
        rng: random.Random | None = None,
    ) -> float | None:
        """After try `attempt` (0 first) ended in `status`: the back-off before the next
        try, or None when there is none (not a retried outcome, no retries or time left)."""
        if status not in self.retry_on or attempt >= self.max_retries:
            return None
        ceiling = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        delay = (rng.random() if rng is not None else random.random()) * ceiling  # full jitter
        if now + delay >= started + self.timeout:
            return None
        return delay
