"""The load balancer's response cache: a shared HTTP cache after RFC 9111, sans-IO.

    cache = ResponseCache(max_bytes=64 << 20, max_entry_bytes=1 << 20)   # WallClock by default

    found = cache.lookup(method, url, request_headers)   # url: host + target, as bytes
    if isinstance(found, Wait):          # another request is fetching the same URL
        found = await found.result()     # (or `found = await cache.get(...)` for both steps)
    if isinstance(found, CachedResponse):
        send(found.status, found.headers_at(cache.now()), found.body)   # carries X-Cache: HIT
    else:                                # a Fill: fetch upstream and offer what comes back
        with found:                      # leaving the block without finish() abandons it
            head = await upstream(...)
            found.response(head.status, head.headers)     # the proxy adds X_CACHE_MISS
            async for chunk in body:
                found.feed(chunk)
                send(chunk)
            found.finish()

API:
- `ResponseCache(max_bytes, max_entry_bytes=..., clock=WallClock(), pass_ttl=10.0)`;
  `lookup(method, url, headers) -> CachedResponse | Fill | Wait`; `await get(...)` (the
  same, waiting for a leader); `purge(url, prefix=False) -> int`; `stats() -> CacheStats`;
  `now() -> float`.
- `Fill.response(status, headers) -> bool` (True: feed the body to store it),
  `Fill.stores` (False for a pass: the answer will not be stored),
  `Fill.feed(chunk) -> bool` (False once the body is over the entry cap),
  `Fill.finish() -> CachedResponse | None`, `Fill.abandon()`; `Fill.leader`.
- `CachedResponse.status`, `.body`, `.size`, `.age(now) -> int`, `.fresh(now) -> bool`,
  `.headers_at(now) -> list[tuple[bytes, bytes]]` (stored headers, Age, X-Cache: HIT).
- `parse_cache_control(value) -> CacheControl` and `parse_http_date(value) -> float | None`
  never raise (they live in `podkit.lb.cachecontrol`, with the other header reading).

Rules (a shared cache):
- Stored: answers to GET with status in `CACHEABLE_STATUS` and explicit freshness
  (s-maxage, else max-age, else Expires minus Date). Not stored: no-store (request or
  response), private, no-cache (revalidation is not done here), Set-Cookie, `Vary: *`,
  a freshness lifetime of 0, a body over `max_entry_bytes` (checked while streaming), a
  body shorter than its Content-Length, and answers to a request with Authorization unless
  the response says public, s-maxage or must-revalidate. No heuristic freshness.
- Served: GET and HEAD, while fresh (current age after RFC 9111 4.2.3 below the lifetime)
  and within the request's max-age and min-fresh; never for request no-cache or
  `Pragma: no-cache`; to a request with Authorization only if the response allowed it.
  Stale entries are dropped, not revalidated.
- Vary: variants of one URL are keyed by the request's values of the named headers.
- Unsafe methods (POST, PUT, DELETE, PATCH...) that succeed (status < 400) purge their URL.
- Coalescing: concurrent misses for one key make one leader `Fill`; the others get a
  `Wait`. Once the leader stores its response, or learns that it cannot (not cacheable,
  too large, upstream failure), each waiter looks again with its own request headers and
  gets a hit or a non-leading `Fill` to fetch itself. A URL whose response was not
  cacheable passes for `pass_ttl` seconds: its misses are neither coalesced nor stored
  (`Fill.stores` is False), so uncacheable URLs do not queue; the first miss after that
  tries again.
- Bounded by bytes (entry size = body + header names and values), least recently used out.
- The clock gives seconds since the epoch, as Date and Expires are compared with it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType

from podkit.clock import Clock, WallClock
from podkit.lb.cachecontrol import (
    NO_DIRECTIVES,
    CacheControl,
    Headers,
    Secondary,
    delta_seconds,
    joined,
    parse_cache_control,
    parse_http_date,
    request_directives,
    secondary_key,
)

__all__ = [
    "CACHEABLE_STATUS",
    "SAFE_METHODS",
    "X_CACHE_HIT",
    "X_CACHE_MISS",
    "CacheControl",
    "CacheStats",
    "CachedResponse",
    "Fill",
    "ResponseCache",
    "Wait",
    "parse_cache_control",
    "parse_http_date",
]

X_CACHE_HIT = (b"X-Cache", b"HIT")
X_CACHE_MISS = (b"X-Cache", b"MISS")
CACHEABLE_STATUS = frozenset({200, 203, 204, 300, 301, 302, 307, 308, 404, 405, 410, 414, 501})
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
# Not stored with a response: they describe one connection or are set again when serving.
_NOT_STORED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"age",
        b"x-cache",
        b"content-length",
    }
)


class CachedResponse:
    """A stored response: status, headers (with Content-Length) and the whole body."""

    __slots__ = (
        "_auth_ok",
        "_born",
        "_expires",
        "body",
        "headers",
        "size",
        "status",
        "url",
        "vary",
    )

    def __init__(
        self,
        url: bytes,
        vary: Secondary,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        born: float,
        lifetime: float,
        auth_ok: bool,
    ) -> None:
        self.url = url
        self.vary = vary
        self.status = status
        self.headers = headers
        self.body = body
        self.size = len(body) + sum(len(k) + len(v) for k, v in headers)
        self._born = born  # the clock time at which the response's age was 0
        self._expires = born + lifetime
        self._auth_ok = auth_ok

    def age(self, now: float) -> int:
        """The current age in whole seconds, as the Age header says it."""
        return int(max(0.0, now - self._born))

    def fresh(self, now: float) -> bool:
        return now < self._expires

    def ttl(self, now: float) -> float:
        """Seconds of freshness left."""
        return self._expires - now

    def headers_at(self, now: float) -> list[tuple[bytes, bytes]]:
        """The headers to send with this response now: stored ones, Age and X-Cache: HIT."""
        return [*self.headers, (b"Age", b"%d" % self.age(now)), X_CACHE_HIT]


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters for metrics."""

    hits: int
    misses: int
    coalesced: int  # lookups that waited for another request's fetch
    bytes: int
    entries: int
    evictions: int
    max_bytes: int

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class _Flight:
    """One upstream fetch that waiters share."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = asyncio.Event()


class _Variants:
    __slots__ = ("by_key", "names")

    def __init__(self, names: tuple[bytes, ...]) -> None:
        self.names = names
        self.by_key: dict[Secondary, CachedResponse] = {}


@dataclass(slots=True)
class _Plan:
    """What `Fill.finish` stores once the body is complete."""

    status: int
    headers: list[tuple[bytes, bytes]]
    born: float
    lifetime: float
    auth_ok: bool
    names: tuple[bytes, ...]
    secondary: Secondary


_PASS, _FILLING, _DONE = 0, 1, 2


class Fill:
    """A miss: the caller fetches upstream and offers the response here to store it."""

    __slots__ = (
        "_auth",
        "_cache",
        "_chunks",
        "_expected",
        "_flight",
        "_invalidate",
        "_key",
        "_plan",
        "_req_headers",
        "_request_time",
        "_size",
        "_state",
        "leader",
        "url",
    )

    def __init__(
        self,
        cache: ResponseCache,
        url: bytes,
        req_headers: Headers,
        *,
        store: bool,
        auth: bool = False,
        key: tuple[bytes, Secondary] | None = None,
        flight: _Flight | None = None,
        invalidate: bool = False,
    ) -> None:
        self._cache = cache
        self.url = url
        self._req_headers = req_headers
        self._auth = auth
        self._key = key
        self._flight = flight
        self.leader = flight is not None  # other requests wait for this one
        self._invalidate = invalidate
        self._request_time = cache.now()
        self._state = _PASS if not store else _FILLING
        self._chunks: list[bytes] = []
        self._size = 0
        self._expected: int | None = None
        self._plan: _Plan | None = None

    @property
    def stores(self) -> bool:
        """Whether the answer may still be stored (False: a pass, fetched for itself)."""
        return self._state == _FILLING

    def response(self, status: int, headers: Headers) -> bool:
        """Offer the upstream's status and headers; True when the body should be fed."""
        if self._invalidate and status < 400:
            self._cache.purge(self.url)
        if self._state != _FILLING:
            self._release()
            return False
        plan = self._cache._plan(status, headers, self._req_headers, self._auth, self._request_time)
        if plan is None:
            self._cache._mark_pass(self.url)
            self._state = _PASS
            self._release()
            return False
        self._plan = plan
        length = joined(headers, b"content-length")
        if length is not None:
            self._expected = int(length) if length.isdigit() else -1
            if self._expected > self._cache.max_entry_bytes or self._expected < 0:
                self._state = _PASS
                self._release()
                return False
        return True

    def feed(self, chunk: bytes | bytearray | memoryview) -> bool:
        """Keep a piece of the body; False once the body is over the entry cap (not stored)."""
        if self._state != _FILLING:
            return False
        self._size += len(chunk)
        if self._size > self._cache.max_entry_bytes:
            self._state = _PASS
            self._chunks = []
            self._release()
            return False
        self._chunks.append(bytes(chunk))
        return True

    def finish(self) -> CachedResponse | None:
        """The body is complete: store the response if it may be, and wake waiters."""
        entry = None
        if self._state == _FILLING and self._plan is not None:
            body = b"".join(self._chunks)
            if self._expected is None or self._expected == len(body):
                entry = self._cache._insert(self.url, self._plan, body)
        self._state = _DONE
        self._chunks = []
        self._release()
        return entry

    def abandon(self) -> None:
        """The fetch failed or was cut short: store nothing, release waiters to fetch."""
        self._state = _DONE
        self._chunks = []
        self._release()

    def _release(self) -> None:
        flight = self._flight
        if flight is not None:
            self._flight = None
            self._cache._land(self._key, flight)

    def __enter__(self) -> Fill:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != _DONE:
            self.abandon()


class Wait:
    """A miss while another request fetches the same key: await `result()`."""

    __slots__ = ("_cache", "_flight", "_headers", "_url")

    def __init__(self, cache: ResponseCache, flight: _Flight, url: bytes, headers: Headers) -> None:
        self._cache = cache
        self._flight = flight
        self._url = url
        self._headers = headers

    async def result(self) -> CachedResponse | Fill:
        """A hit once the leader stored a matching response, else a Fill to fetch oneself."""
        await self._flight.done.wait()
        return self._cache._after_wait(self._url, self._headers)


class ResponseCache:
    """Stored responses by URL and Vary, bounded by bytes, with request coalescing."""

    def __init__(
        self,
        max_bytes: int,
        max_entry_bytes: int = 1 << 20,
        clock: Clock | None = None,
        pass_ttl: float = 10.0,
        max_pass: int = 4096,
    ) -> None:
        if max_bytes <= 0 or max_entry_bytes <= 0:
            raise ValueError("cache sizes must be positive")
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.clock: Clock = clock or WallClock()
        self.pass_ttl = pass_ttl
        self.max_pass = max_pass
        self._lru: OrderedDict[tuple[bytes, Secondary], CachedResponse] = OrderedDict()
        self._urls: dict[bytes, _Variants] = {}
        self._inflight: dict[tuple[bytes, Secondary], _Flight] = {}
        self._pass: dict[bytes, float] = {}  # URL -> until when it is fetched uncoalesced
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.coalesced = 0
        self.evictions = 0

    def now(self) -> float:
        return self.clock.now()

    def lookup(self, method: bytes, url: bytes, headers: Headers) -> CachedResponse | Fill | Wait:
        """A fresh stored response (HIT), a Fill (MISS: fetch it), or a Wait (being fetched)."""
        if method != b"GET" and method != b"HEAD":
            self.misses += 1
            return Fill(self, url, headers, store=False, invalidate=method not in SAFE_METHODS)
        cc, auth, reload = request_directives(headers)
        found, secondary = (None, ()) if reload else self._find(url, headers, cc, auth)
        if found is not None:
            self.hits += 1
            return found
        store = method == b"GET" and not cc.no_store and not self._passing(url)
        key = (url, secondary)
        flight = self._inflight.get(key)
        if not store or reload:
            flight = None  # fetched on its own: nobody waits for it, it waits for nobody
        elif flight is not None:
            self.coalesced += 1  # counted as a hit or a miss once the wait is over
            return Wait(self, flight, url, headers)
        else:
            flight = self._inflight[key] = _Flight()
        self.misses += 1
        return Fill(self, url, headers, store=store, auth=auth, key=key, flight=flight)

    async def get(self, method: bytes, url: bytes, headers: Headers) -> CachedResponse | Fill:
        """`lookup`, waiting for the leader's fetch when there is one."""
        found = self.lookup(method, url, headers)
        if isinstance(found, Wait):
            return await found.result()
        return found

    def purge(self, url: bytes | str, prefix: bool = False) -> int:
        """Drop the entries of one URL, or of every URL starting with `url`; how many."""
        key = url.encode("latin-1") if isinstance(url, str) else url
        urls = [u for u in self._urls if u.startswith(key)] if prefix else [key]
        removed = 0
        for u in urls:
            variants = self._urls.get(u)
            if variants is not None:
                for entry in list(variants.by_key.values()):
                    self._remove(entry)
                    removed += 1
        return removed

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            coalesced=self.coalesced,
            bytes=self._bytes,
            entries=len(self._lru),
            evictions=self.evictions,
            max_bytes=self.max_bytes,
        )

    def __len__(self) -> int:
        return len(self._lru)

    # -- internals --

    def _find(
        self, url: bytes, headers: Headers, cc: CacheControl, auth: bool
    ) -> tuple[CachedResponse | None, Secondary]:
        variants = self._urls.get(url)
        if variants is None:
            return None, ()
        secondary = secondary_key(variants.names, headers) if variants.names else ()
        entry = variants.by_key.get(secondary)
        if entry is None:
            return None, secondary
        now = self.clock.now()
        if not entry.fresh(now):
            self._remove(entry)
            return None, secondary
        if auth and not entry._auth_ok:
            return None, secondary
        if cc.max_age is not None and entry.age(now) > cc.max_age:
            return None, secondary
        if cc.min_fresh is not None and entry.ttl(now) < cc.min_fresh:
            return None, secondary
        self._lru.move_to_end((url, secondary))
        return entry, secondary

    def _after_wait(self, url: bytes, headers: Headers) -> CachedResponse | Fill:
        cc, auth, _ = request_directives(headers)
        found, _ = self._find(url, headers, cc, auth)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        return Fill(self, url, headers, store=not cc.no_store, auth=auth)

    def _passing(self, url: bytes) -> bool:
        """Whether `url` recently gave an uncacheable response (fetch it uncoalesced)."""
        until = self._pass.get(url)
        if until is None:
            return False
        if until > self.clock.now():
            return True
        del self._pass[url]
        return False

    def _land(self, key: tuple[bytes, Secondary] | None, flight: _Flight) -> None:
        if key is not None and self._inflight.get(key) is flight:
            del self._inflight[key]
        flight.done.set()

    def _mark_pass(self, url: bytes) -> None:
        if self.pass_ttl <= 0:
            return
        self._pass.pop(url, None)
        self._pass[url] = self.clock.now() + self.pass_ttl
        if len(self._pass) > self.max_pass:
            del self._pass[next(iter(self._pass))]

    def _plan(
        self,
        status: int,
        headers: Headers,
        req_headers: Headers,
        auth: bool,
        request_time: float,
    ) -> _Plan | None:
        """How to store this response, or None when it may not be stored."""
        if status not in CACHEABLE_STATUS:
            return None
        cc_value = joined(headers, b"cache-control")
        cc = parse_cache_control(cc_value) if cc_value is not None else NO_DIRECTIVES
        if cc.no_store or cc.private or cc.no_cache:
            return None
        auth_ok = cc.public or cc.s_maxage is not None or cc.must_revalidate
        if auth and not auth_ok:
            return None
        vary_value = joined(headers, b"vary")
        names: tuple[bytes, ...] = ()
        if vary_value is not None:
            parts = {p.strip().lower() for p in vary_value.split(b",")}
            parts.discard(b"")
            if b"*" in parts:
                return None
            names = tuple(sorted(parts))
        now = self.clock.now()
        date_value = joined(headers, b"date")
        date = parse_http_date(date_value) if date_value is not None else None
        if cc.s_maxage is not None:
            lifetime = float(cc.s_maxage)
        elif cc.max_age is not None:
            lifetime = float(cc.max_age)
        else:
            expires_value = joined(headers, b"expires")
            if expires_value is None:
                return None  # no explicit freshness: no heuristics here
            expires = parse_http_date(expires_value)
            if expires is None:
                return None  # an invalid Expires means already expired
            lifetime = expires - (date if date is not None else now)
        # RFC 9111 4.2.3: the age the response had when it arrived.
        age_value = joined(headers, b"age")
        age = delta_seconds(age_value.decode("latin-1")) if age_value is not None else 0
        apparent_age = max(0.0, now - date) if date is not None else 0.0
        corrected_age = age + max(0.0, now - request_time)
        initial_age = max(apparent_age, corrected_age)
        if lifetime <= initial_age:
            return None
        kept: list[tuple[bytes, bytes]] = []
        for k, v in headers:
            lk = k.lower()
            if lk == b"set-cookie":
                return None
            if lk not in _NOT_STORED:
                kept.append((k, v))
        secondary = secondary_key(names, req_headers)
        return _Plan(status, kept, now - initial_age, lifetime, auth_ok, names, secondary)

    def _insert(
        self,
        url: bytes,
        plan: _Plan,
        body: bytes,
    ) -> CachedResponse | None:
        headers = plan.headers
        if plan.status != 204:
            headers = [*headers, (b"Content-Length", b"%d" % len(body))]
        secondary = plan.secondary
        entry = CachedResponse(
            url, secondary, plan.status, headers, body, plan.born, plan.lifetime, plan.auth_ok
        )
        if entry.size > self.max_entry_bytes or not entry.fresh(self.clock.now()):
            return None
        vary_names = plan.names
        variants = self._urls.get(url)
        if variants is not None and variants.names != vary_names:
            self.purge(url)  # the URL now varies on other headers: old variants are unreachable
            variants = None
        old = variants.by_key.get(secondary) if variants is not None else None
        if old is not None:
            self._remove(old)
        while self._lru and self._bytes + entry.size > self.max_bytes:
            _, victim = self._lru.popitem(last=False)
            self._remove(victim)
            self.evictions += 1
        variants = self._urls.get(url)
        if variants is None:
            variants = self._urls[url] = _Variants(vary_names)
        variants.by_key[secondary] = entry
        self._lru[(url, secondary)] = entry
        self._bytes += entry.size
        self._pass.pop(url, None)
        return entry

    def _remove(self, entry: CachedResponse) -> None:
        self._lru.pop((entry.url, entry.vary), None)
        variants = self._urls.get(entry.url)
        if variants is not None and variants.by_key.get(entry.vary) is entry:
            del variants.by_key[entry.vary]
            if not variants.by_key:
                del self._urls[entry.url]
        self._bytes -= entry.size
