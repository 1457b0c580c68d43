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

- `is_retryable` and `RetryRate` (the proxy's own retry budget, always on) live with
  the engine, in `podkit.net.proxy.retry`.

A retry is admitted by `Breaker.admit_retry` when, counting it, the retries in flight
stay within `percent` of the requests in flight (retries included), or within
`min_concurrency`; and when `max_requests` allows one more request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final, Literal

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
