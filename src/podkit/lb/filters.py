"""The filters `podkit lb` builds from its flags: rate limits, the cache, health, breakers.

Each one adapts a sans-IO module (`podkit.lb.ratelimit`, `cache`, `health`, `breaker`) to
the proxy's pipeline (`podkit.net.proxy.hooks.Filter`). `podkit lb` installs them in this order:
`RateLimitFilter`, `CacheFilter`, `HealthFilter`, `BreakerFilter` (the breaker last: its
`admit` takes slots that only `on_done` gives back, so no filter after it may refuse).

- `RateLimitFilter`: 429 with Retry-After when the client's bucket or the global one is
  empty; nothing reaches an upstream.
- `CacheFilter`: a fresh stored answer is sent at once with `X-Cache: HIT`; a miss goes
  upstream with `X-Cache: MISS` added to the answer, whose body is stored while it streams
  (up to the entry cap); concurrent misses of one URL wait for the first one's answer.
  Successful unsafe requests (POST, PUT, DELETE, PATCH) purge their URL.
- `HealthFilter`: passive outlier ejection from each try's outcome, active checks
  (`run()`: GET path on every host each interval), and `Upstream.available` kept equal
  to the health verdict, so the policies skip hosts that are unhealthy or ejected.
- `BreakerFilter`: per-upstream limits (connections, pending connects, requests in
  flight) and a retry budget over all upstreams; over a limit the policy is asked for
  another upstream, and the client gets 503 at once when none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from podkit.lb.breaker import Breaker, Limits, Refusal, RetryBudget, Ticket
from podkit.lb.cache import X_CACHE_MISS, CachedResponse, Fill, ResponseCache, Wait
from podkit.lb.health import CONNECT_ERROR, HealthEvent, HostHealth
from podkit.lb.policy import Upstream
from podkit.lb.ratelimit import RateLimiter
from podkit.net.http import ResponseHead
from podkit.net.httpwrite import request_head, response_head, simple_response
from podkit.net.proxy.hooks import BaseFilter, BodyObserver

X_CACHE_MISS_LINE = b"%b: %b\r\n" % X_CACHE_MISS

if TYPE_CHECKING:
    from podkit.net.proxy.engine import Exchange, Proxy

_UNSAFE = frozenset({b"POST", b"PUT", b"DELETE", b"PATCH"})


def _user(ex: Exchange) -> dict[str, object]:
    user = ex.user
    if user is None:
        user = ex.user = {}
    return user


class RateLimitFilter(BaseFilter):
    """429 with Retry-After for requests over their key's rate or the global one."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def on_request(self, ex: Exchange) -> bytes | None:
        limiter = self.limiter
        wait = limiter.check(limiter.key(ex.client_address, ex.head.headers))
        if not wait:
            return None
        return simple_response(
            429,
            b"podkit lb: rate limit exceeded, retry in %d s\n" % wait,
            headers=[(b"Retry-After", b"%d" % wait)],
            close=not ex.head.keep_alive,
        )


class _Store:
    """Streams a response body into a cache `Fill`."""

    __slots__ = ("fill",)

    def __init__(self, fill: Fill) -> None:
        self.fill = fill

    def feed(self, data: bytes) -> None:
        self.fill.feed(data)

    def end(self) -> None:
        self.fill.finish()

    def abort(self) -> None:
        self.fill.abandon()


class _Leader:
    """Holds an exchange's cache `Fill`; abandons it when the exchange is dropped without
    an answer (a later filter's local answer, no upstream), so waiters never hang."""

    __slots__ = ("fill",)

    def __init__(self, fill: Fill) -> None:
        self.fill = fill

    def __del__(self) -> None:
        self.fill.abandon()  # after finish() this does nothing


def _hit_bytes(ex: Exchange, entry: CachedResponse, now: float) -> bytes:
    head = response_head(entry.status, entry.headers_at(now), close=not ex.head.keep_alive)
    return head if ex.head.method == b"HEAD" else head + entry.body


class CacheFilter(BaseFilter):
    """Answers from a `ResponseCache`, fills it from upstream answers (see the module doc)."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    @staticmethod
    def url(ex: Exchange) -> bytes:
        """The cache key of a request: its Host and target."""
        return (ex.head.header(b"host") or b"") + ex.head.target

    def on_request(self, ex: Exchange) -> bytes | Awaitable[bytes | None] | None:
        method = ex.head.method
        if method != b"GET" and method != b"HEAD":
            if method in _UNSAFE:
                _user(ex)["purge"] = self.url(ex)
            return None
        found = self.cache.lookup(method, self.url(ex), ex.head.headers)
        if isinstance(found, CachedResponse):
            return _hit_bytes(ex, found, self.cache.now())
        if isinstance(found, Wait):
            return self._wait(ex, found)
        self._miss(ex, found)
        return None

    async def _wait(self, ex: Exchange, wait: Wait) -> bytes | None:
        found = await wait.result()
        if isinstance(found, CachedResponse):
            return _hit_bytes(ex, found, self.cache.now())
        self._miss(ex, found)
        return None

    @staticmethod
    def _miss(ex: Exchange, fill: Fill) -> None:
        """A miss goes upstream: its answer is read to be stored, or, for a pass (nothing
        to store, nobody waiting), waived and sent on with `X-Cache: MISS`."""
        if fill.stores:
            _user(ex)["fill"] = _Leader(fill)
        else:
            ex.waive_response(X_CACHE_MISS_LINE)

    def on_response(self, ex: Exchange, head: ResponseHead) -> BodyObserver | None:
        user = ex.user
        if user is None:
            return None
        url = user.get("purge")
        if isinstance(url, bytes) and head.status < 400:
            self.cache.purge(url)
        leader = user.get("fill")
        if not isinstance(leader, _Leader):
            return None
        head.headers.append(X_CACHE_MISS)
        if leader.fill.response(head.status, head.headers):
            return _Store(leader.fill)
        return None

    def on_done(
        self, ex: Exchange, upstream: Upstream, status: int | None, error: str | None
    ) -> None:
        if status is None and ex.user is not None:
            leader = ex.user.get("fill")
            if isinstance(leader, _Leader):
                leader.fill.abandon()  # the waiters fetch for themselves


class HealthFilter(BaseFilter):
    """Passive and active health of the upstreams, applied to `Upstream.available`."""

    def __init__(self, health: HostHealth, *, log: Callable[[str], None] = lambda _: None) -> None:
        self.health = health
        self.log = log
        self.lb: Proxy | None = None
        self.checks = 0  # active checks made
        self.ejected: dict[str, int] = {}  # ejections per host
        health.on_event = self._event

    def attach(self, lb: Proxy) -> None:
        """Follow `lb`'s upstreams (call again after each `lb.set_upstreams`)."""
        self.lb = lb
        self.health.set_hosts(u.name for u in lb.upstreams)
        self.sync()

    def sync(self) -> None:
        """Make `Upstream.available` say what the health verdict says."""
        lb = self.lb
        if lb is None:
            return
        eligible = set(self.health.eligible())
        for u in lb.upstreams:
            u.available = u.name in eligible

    def _event(self, event: HealthEvent) -> None:
        if event.kind == "ejected":
            self.ejected[event.host] = self.ejected.get(event.host, 0) + 1
        if event.kind in ("ejected", "unhealthy", "healthy", "returned"):
            self.log(f"upstream {event.host} {event.kind}")

    def on_done(
        self, ex: Exchange, upstream: Upstream, status: int | None, error: str | None
    ) -> None:
        if status is None and (ex.client.transport is None or ex.local is not None):
            return  # the client went away, or sent a bad body: nothing learned
        before = self.health.ejections
        self.health.record_result(upstream.name, CONNECT_ERROR if status is None else status)
        if self.health.ejections != before:
            self.sync()

    async def check(self, host: str, port: int, timeout: float) -> bool:
        """One active check: GET path; passes on 2xx and 3xx within `timeout`."""
        active = self.health.active
        assert active is not None
        self.checks += 1
        writer = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
                host_field = (b"Host", b"%b:%d" % (host.encode(), port))
                fields = [host_field, (b"User-Agent", b"podkit-lb-check")]
                writer.write(request_head(b"GET", active.path.encode(), fields, close=True))
                line = await reader.readline()
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
        parts = line.split(b" ", 2)
        return len(parts) >= 2 and parts[1].isdigit() and active.passed(int(parts[1]))

    async def run(self, tick: float = 0.1) -> None:
        """Run due active checks and end ejections that are over, until cancelled."""
        health = self.health
        active = health.active
        running: set[asyncio.Task[None]] = set()

        async def one(name: str) -> None:
            host, _, port = name.rpartition(":")
            passed = await self.check(host, int(port), active.timeout if active else 1.0)
            health.record_check(name, passed)
            self.sync()

        while True:
            for name in health.due_checks():
                task = asyncio.create_task(one(name))
                running.add(task)
                task.add_done_callback(running.discard)
            health.sync_shared()  # the other workers' ejections and verdicts
            self.sync()  # ejections end by the clock
            await asyncio.sleep(min(tick, health.next_check_in()))


class BreakerFilter(BaseFilter):
    """Per-upstream circuit breakers and a retry budget over all upstreams."""

    # on_response only frees the pending slot early; on_done frees it too, so an answer
    # that arrives whole in one read need not be parsed for it
    observes_responses = False

    def __init__(self, limits: Limits, budget: RetryBudget | None = None) -> None:
        self.limits = limits
        self.breakers: dict[str, Breaker] = {}
        never = Limits(1 << 62, 1 << 62, 1 << 62)
        self.cluster = Breaker(never, budget or RetryBudget())  # counts tries for the budget
        self.overflows = 0
        self.retries = 0

    def breaker(self, upstream: Upstream) -> Breaker:
        b = self.breakers.get(upstream.name)
        if b is None:
            b = self.breakers[upstream.name] = Breaker(self.limits)
        return b

    def admit(self, ex: Exchange, upstream: Upstream) -> bool:
        retry = ex.tries > 0
        budget = self.cluster.admit_retry() if retry else self.cluster.admit_request()
        if isinstance(budget, Refusal):
            self.overflows += 1
            return False
        b = self.breaker(upstream)
        tickets: list[Ticket] = [budget]
        pool = upstream.pool
        if pool is not None and not pool.idle:  # a new connection is needed
            if upstream.inflight + len(pool.idle) >= self.limits.max_connections:
                return self._refuse(tickets, b.admit_connection())
            pending = b.admit_pending()
            if isinstance(pending, Refusal):
                return self._refuse(tickets, pending)
            tickets.append(pending)
            _user(ex)["pending"] = pending
        ticket = b.admit_request()
        if isinstance(ticket, Refusal):
            return self._refuse(tickets, ticket)
        tickets.append(ticket)
        if retry:
            self.retries += 1
        _user(ex)["tickets"] = tickets
        return True

    def _refuse(self, tickets: list[Ticket], refusal: Ticket | Refusal) -> bool:
        if isinstance(refusal, Ticket):
            refusal.release()  # the connection limit is checked, not held
        for t in tickets:
            t.release()
        self.overflows += 1
        return False

    def on_response(self, ex: Exchange, head: ResponseHead) -> BodyObserver | None:
        pending = ex.user.get("pending") if ex.user is not None else None
        if isinstance(pending, Ticket):
            pending.release()  # connected and answering: no longer pending
        return None

    def on_done(
        self, ex: Exchange, upstream: Upstream, status: int | None, error: str | None
    ) -> None:
        user = ex.user
        tickets = user.pop("tickets", None) if user is not None else None
        if isinstance(tickets, list):
            for t in tickets:
                t.release()


class Timing(BaseFilter):
    """Per-try latency and outcome, reported to `record(upstream, status, seconds)`."""

    def __init__(self, record: Callable[[Upstream, int | None, float], None]) -> None:
        self.record = record
        self.retries = 0

    def admit(self, ex: Exchange, upstream: Upstream) -> bool:
        user = _user(ex)
        if ex.tries > 0 and user.get("try") != ex.tries:  # once per retry, not per candidate
            self.retries += 1
            user["try"] = ex.tries
        user["t0"] = time.perf_counter()
        return True

    def on_done(
        self, ex: Exchange, upstream: Upstream, status: int | None, error: str | None
    ) -> None:
        user = ex.user
        t0 = user.get("t0") if user is not None else None
        elapsed = time.perf_counter() - t0 if isinstance(t0, float) else 0.0
        with contextlib.suppress(Exception):
            self.record(upstream, status, elapsed)
