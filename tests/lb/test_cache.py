"""The response cache: RFC 9111 storing and serving rules, Vary, LRU bytes, coalescing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podkit.clock import ManualClock
from podkit.lb.cache import (
    X_CACHE_HIT,
    CachedResponse,
    Fill,
    ResponseCache,
    Wait,
    parse_cache_control,
    parse_http_date,
)

T0 = 1_700_000_000.0
URL = b"example.test/a"
Headers = list[tuple[bytes, bytes]]


def http_date(ts: float) -> bytes:
    return formatdate(ts, usegmt=True).encode()


def make(max_bytes: int = 1 << 20, max_entry_bytes: int = 1 << 16) -> ResponseCache:
    return ResponseCache(max_bytes, max_entry_bytes, clock=ManualClock(T0))


def clock_of(cache: ResponseCache) -> ManualClock:
    assert isinstance(cache.clock, ManualClock)
    return cache.clock


def serve(
    cache: ResponseCache,
    url: bytes = URL,
    *,
    status: int = 200,
    headers: Headers | None = None,
    body: bytes = b"hello",
    req: Headers | None = None,
    method: bytes = b"GET",
) -> tuple[str, bytes, Headers]:
    """One request through the cache with a stub upstream: (X-Cache, body, headers sent)."""
    found = cache.lookup(method, url, req or [])
    assert not isinstance(found, Wait)
    if isinstance(found, CachedResponse):
        return "HIT", found.body, found.headers_at(cache.now())
    with found:
        resp = headers if headers is not None else [(b"Cache-Control", b"max-age=60")]
        if found.response(status, resp):
            found.feed(body)
        found.finish()
    return "MISS", body, resp


def header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


# -- parsing --


def test_cache_control_directives() -> None:
    cc = parse_cache_control(b'Public, MAX-AGE=60, s-maxage="120", no-cache="Set-Cookie, X-A"')
    assert (cc.public, cc.max_age, cc.s_maxage, cc.no_cache) == (True, 60, 120, True)
    assert not cc.no_store and not cc.private
    assert parse_cache_control("no-store, private").no_store
    assert parse_cache_control("no-store, private").private
    assert parse_cache_control("must-revalidate").must_revalidate
    assert parse_cache_control("max-age=abc").max_age == 0  # invalid: treated as stale
    assert parse_cache_control("max-age=10, max-age=99").max_age == 10  # the first wins
    assert parse_cache_control("max-age=99999999999999").max_age == 2**31  # RFC 9111 1.2.2
    assert parse_cache_control("").max_age is None


@given(st.one_of(st.text(), st.binary()))
def test_cache_control_parsing_never_raises(value: str | bytes) -> None:
    cc = parse_cache_control(value)
    assert cc.max_age is None or 0 <= cc.max_age <= 2**31


@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.booleans(),
    st.booleans(),
    st.sampled_from([", ", ",", " , "]),
)
def test_cache_control_reads_back_what_was_written(
    max_age: int, s_maxage: int, no_store: bool, private: bool, sep: str
) -> None:
    parts = [f"max-age={max_age}", f's-maxage="{s_maxage}"']
    parts += ["no-store"] * no_store + ["private"] * private
    cc = parse_cache_control(sep.join(parts))
    assert (cc.max_age, cc.s_maxage, cc.no_store, cc.private) == (
        max_age,
        s_maxage,
        no_store,
        private,
    )


def test_http_dates_in_all_three_formats() -> None:
    expected = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC).timestamp()
    assert parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == expected
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == expected
    assert parse_http_date("Sun Nov  6 08:49:37 1994") == expected
    assert parse_http_date(b"0") is None
    assert parse_http_date(b"yesterday") is None


@given(st.one_of(st.text(), st.binary()))
def test_http_date_parsing_never_raises(value: str | bytes) -> None:
    parse_http_date(value)


# -- storing and serving --


async def test_fresh_response_is_a_hit_with_its_age_until_it_expires() -> None:
    cache = make()
    assert serve(cache)[0] == "MISS"
    await clock_of(cache).advance(10)
    state, body, headers = serve(cache, body=b"other")
    assert (state, body) == ("HIT", b"hello")
    assert header(headers, b"age") == b"10"
    assert header(headers, b"content-length") == b"5"
    assert X_CACHE_HIT in headers
    await clock_of(cache).advance(50)  # age 60 = max-age: stale
    assert serve(cache, body=b"new")[0] == "MISS"
    assert serve(cache)[1] == b"new"


async def test_age_counts_the_upstream_age_and_the_date() -> None:
    cache = make()
    serve(cache, headers=[(b"Cache-Control", b"max-age=60"), (b"Age", b"50")])
    await clock_of(cache).advance(9)
    assert serve(cache)[0] == "HIT"
    await clock_of(cache).advance(1)
    assert serve(cache)[0] == "MISS"  # 50 + 10 seconds old
    # A Date 30 s in the past: the response was already 30 s old when it arrived.
    other = b"example.test/b"
    date = http_date(cache.now() - 30)
    serve(cache, other, headers=[(b"Cache-Control", b"max-age=40"), (b"Date", date)])
    state, _, headers = serve(cache, other)
    assert state == "HIT" and header(headers, b"age") == b"30"
    await clock_of(cache).advance(10)
    assert serve(cache, other)[0] == "MISS"


async def test_expires_minus_date_is_the_lifetime_and_s_maxage_wins_over_max_age() -> None:
    cache = make()
    now = cache.now()
    expires = [(b"Date", http_date(now)), (b"Expires", http_date(now + 20))]
    serve(cache, headers=expires)
    await clock_of(cache).advance(19)
    assert serve(cache)[0] == "HIT"
    await clock_of(cache).advance(1)
    assert serve(cache)[0] == "MISS"
    b = b"example.test/b"
    serve(cache, b, headers=[(b"Cache-Control", b"max-age=5, s-maxage=100")])
    await clock_of(cache).advance(50)
    assert serve(cache, b)[0] == "HIT"
    c = b"example.test/c"
    serve(cache, c, headers=[(b"Cache-Control", b"max-age=100"), (b"Expires", b"0")])
    assert serve(cache, c)[0] == "HIT"  # max-age overrides Expires


@pytest.mark.parametrize(
    ("status", "headers", "req"),
    [
        (200, [(b"Cache-Control", b"no-store, max-age=60")], []),
        (200, [(b"Cache-Control", b"private, max-age=60")], []),
        (200, [(b"Cache-Control", b"no-cache, max-age=60")], []),
        (200, [(b"Cache-Control", b"max-age=60"), (b"Set-Cookie", b"s=1")], []),
        (200, [(b"Cache-Control", b"max-age=60"), (b"Vary", b"*")], []),
        (200, [(b"Cache-Control", b"max-age=0")], []),
        (200, [], []),  # no explicit freshness
        (200, [(b"Expires", b"not a date")], []),
        (500, [(b"Cache-Control", b"max-age=60")], []),
        (206, [(b"Cache-Control", b"max-age=60")], []),
        (200, [(b"Cache-Control", b"max-age=60")], [(b"Cache-Control", b"no-store")]),
        (200, [(b"Cache-Control", b"max-age=60")], [(b"Authorization", b"Bearer x")]),
    ],
)
def test_responses_a_shared_cache_must_not_store(
    status: int, headers: Headers, req: Headers
) -> None:
    cache = make()
    serve(cache, status=status, headers=headers, req=req)
    assert serve(cache, status=status, headers=headers, req=req)[0] == "MISS"
    assert len(cache) == 0


def test_authorization_needs_public_s_maxage_or_must_revalidate() -> None:
    auth = [(b"authorization", b"Bearer x")]
    for cc in (b"public, max-age=60", b"s-maxage=60", b"must-revalidate, max-age=60"):
        cache = make()
        serve(cache, headers=[(b"Cache-Control", cc)], req=auth)
        assert serve(cache, req=auth)[0] == "HIT"
    cache = make()
    serve(cache)  # stored for a request without credentials, max-age only
    assert serve(cache)[0] == "HIT"
    assert serve(cache, req=auth)[0] == "MISS"


def test_not_stored_headers_are_dropped_and_not_served() -> None:
    cache = make()
    serve(
        cache,
        headers=[
            (b"Cache-Control", b"max-age=60"),
            (b"Connection", b"keep-alive"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Type", b"text/plain"),
        ],
    )
    _, _, headers = serve(cache)
    names = [k.lower() for k, _ in headers]
    assert b"transfer-encoding" not in names and b"connection" not in names
    assert header(headers, b"content-type") == b"text/plain"
    assert names.count(b"content-length") == 1


async def test_request_directives_bypass_or_limit_the_cache() -> None:
    cache = make()
    serve(cache)
    await clock_of(cache).advance(30)
    assert serve(cache, req=[(b"Cache-Control", b"no-cache")], body=b"v2")[0] == "MISS"
    assert serve(cache)[1] == b"v2"  # the reload stored its fresh response
    await clock_of(cache).advance(30)
    assert serve(cache, req=[(b"Pragma", b"no-cache")])[0] == "MISS"
    # Each miss below stores a new response, so each check starts from age 0.
    await clock_of(cache).advance(30)
    assert serve(cache, req=[(b"Cache-Control", b"max-age=10")])[0] == "MISS"  # 30 s old
    await clock_of(cache).advance(30)
    assert serve(cache, req=[(b"Cache-Control", b"min-fresh=40")])[0] == "MISS"  # 30 s left
    await clock_of(cache).advance(30)
    assert serve(cache, req=[(b"Cache-Control", b"max-age=40, min-fresh=20")])[0] == "HIT"


def test_head_is_served_from_a_stored_get_and_not_stored_itself() -> None:
    cache = make()
    serve(cache, method=b"HEAD")
    assert len(cache) == 0
    serve(cache)
    assert serve(cache, method=b"HEAD")[0] == "HIT"


def test_vary_keeps_one_variant_per_request_header_value() -> None:
    cache = make()
    vary = [(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept-Encoding")]
    gzip, br = [(b"Accept-Encoding", b"gzip")], [(b"accept-encoding", b"br")]
    serve(cache, headers=vary, body=b"gz", req=gzip)
    assert serve(cache, headers=vary, body=b"brotli", req=br)[0] == "MISS"
    assert serve(cache, req=gzip)[1] == b"gz"
    assert serve(cache, req=br)[1] == b"brotli"
    assert serve(cache, headers=vary)[0] == "MISS"  # no Accept-Encoding: a third variant
    assert serve(cache)[0] == "HIT"
    assert cache.stats().entries == 3


def test_unsafe_methods_that_succeed_purge_their_url() -> None:
    cache = make()
    serve(cache)
    serve(cache, method=b"POST", status=400)
    assert serve(cache)[0] == "HIT"
    serve(cache, method=b"POST", status=201)
    assert serve(cache)[0] == "MISS"


def test_purge_by_url_and_by_prefix() -> None:
    cache = make()
    for path in (b"h/a", b"h/a/1", b"h/a/2", b"h/b"):
        serve(cache, path)
    assert cache.purge("h/a") == 1
    assert serve(cache, b"h/a/1")[0] == "HIT"
    assert cache.purge(b"h/a/", prefix=True) == 2
    assert [serve(cache, p)[0] for p in (b"h/a/1", b"h/a/2", b"h/b")] == ["MISS", "MISS", "HIT"]


# -- size bounds --


def test_lru_evicts_the_least_recently_used_first() -> None:
    body = b"x" * 1000
    cache = make(max_bytes=3500)
    for path in (b"a", b"b", b"c"):
        serve(cache, path, body=body)
    serve(cache, b"a")  # a is now the most recently used
    serve(cache, b"d", body=body)
    assert [serve(cache, p)[0] for p in (b"a", b"c", b"d")] == ["HIT", "HIT", "HIT"]
    assert serve(cache, b"b")[0] == "MISS"
    assert cache.stats().evictions >= 1


@settings(max_examples=60, deadline=None)
@given(
    st.integers(200, 5000),
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3000)), max_size=40),
)
def test_lru_never_exceeds_its_byte_bound(max_bytes: int, ops: list[tuple[int, int]]) -> None:
    cache = make(max_bytes=max_bytes, max_entry_bytes=max_bytes)
    for n, size in ops:
        serve(cache, b"u%d" % n, body=b"x" * size)
        stats = cache.stats()
        assert stats.bytes <= max_bytes
        assert stats.entries == len(cache)


def test_entry_size_is_body_plus_headers_and_stats_add_up() -> None:
    cache = make()
    sizes = []
    for n in range(5):
        found = cache.lookup(b"GET", b"u%d" % n, [])
        assert isinstance(found, Fill)
        found.response(200, [(b"Cache-Control", b"max-age=60"), (b"ETag", b"v%d" % n)])
        found.feed(b"z" * (100 * n))
        entry = found.finish()
        assert entry is not None
        assert entry.size == len(entry.body) + sum(len(k) + len(v) for k, v in entry.headers)
        sizes.append(entry.size)
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.misses) == (5, sum(sizes), 5)


def test_streamed_body_is_stored_only_below_the_entry_cap() -> None:
    cache = make(max_entry_bytes=1000)
    found = cache.lookup(b"GET", URL, [])
    assert isinstance(found, Fill)
    assert found.response(200, [(b"Cache-Control", b"max-age=60")])
    assert found.feed(b"x" * 600)
    assert not found.feed(b"x" * 600)  # over the cap: stop accumulating
    assert found.finish() is None
    assert len(cache) == 0
    found = cache.lookup(b"GET", URL, [])
    assert isinstance(found, Fill)
    found.response(200, [(b"Cache-Control", b"max-age=60")])
    for _ in range(8):
        found.feed(memoryview(b"y" * 100))
    entry = found.finish()
    assert entry is not None and entry.body == b"y" * 800


async def test_declared_length_over_the_cap_or_a_short_body_is_not_stored() -> None:
    cache = make(max_entry_bytes=1000)
    big = [(b"Cache-Control", b"max-age=60"), (b"Content-Length", b"5000")]
    found = cache.lookup(b"GET", URL, [])
    assert isinstance(found, Fill)
    assert not found.response(200, big)
    found.finish()
    found = cache.lookup(b"GET", URL, [])
    assert isinstance(found, Fill)
    assert found.response(200, [(b"Cache-Control", b"max-age=60"), (b"Content-Length", b"10")])
    found.feed(b"12345")  # the upstream closed early
    assert found.finish() is None
    assert len(cache) == 0


# -- coalescing --


class Upstream:
    """A stub upstream behind the cache that counts its fetches (each takes 10 ms)."""

    def __init__(self, cc: bytes = b"max-age=60", fail: bool = False) -> None:
        self.fetches = 0
        self.cc = cc
        self.fail = fail

    async def request(self, cache: ResponseCache, req: Headers | None = None) -> tuple[str, bytes]:
        found = await cache.get(b"GET", URL, req or [])
        if isinstance(found, CachedResponse):
            return "HIT", found.body
        with found:
            self.fetches += 1
            body = b"body %d" % self.fetches
            await asyncio.sleep(0.01)
            if self.fail:
                raise ConnectionError("upstream went away")
            if found.response(200, [(b"Cache-Control", self.cc)]):
                found.feed(body)
            found.finish()
        return "MISS", body


async def test_concurrent_misses_make_one_upstream_fetch() -> None:
    cache, upstream = make(), Upstream()
    results = await asyncio.gather(*(upstream.request(cache) for _ in range(20)))
    assert upstream.fetches == 1
    assert {body for _, body in results} == {b"body 1"}
    assert [state for state, _ in results].count("MISS") == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.coalesced) == (19, 1, 19)


async def test_waiters_fetch_themselves_when_the_leader_cannot_store() -> None:
    cache, upstream = make(), Upstream(cc=b"no-store")
    results = await asyncio.gather(*(upstream.request(cache) for _ in range(5)))
    assert upstream.fetches == 5
    assert len({body for _, body in results}) == 5  # each got its own fresh response
    # The URL is known to be uncacheable now: new requests do not queue behind each other.
    first = cache.lookup(b"GET", URL, [])
    second = cache.lookup(b"GET", URL, [])
    assert isinstance(first, Fill) and isinstance(second, Fill)
    assert not first.leader and not second.leader


async def test_an_uncacheable_url_passes_for_pass_ttl_then_is_tried_again() -> None:
    cache = make()
    fill = cache.lookup(b"GET", URL, [])
    assert isinstance(fill, Fill) and fill.stores and fill.leader
    assert not fill.response(200, [(b"Cache-Control", b"private")])
    fill.finish()
    for _ in range(3):  # a pass: fetched alone, not stored even if it turned cacheable
        found = cache.lookup(b"GET", URL, [])
        assert isinstance(found, Fill) and not found.stores and not found.leader
        assert not found.response(200, [(b"Cache-Control", b"max-age=60")])
        found.finish()
    await clock_of(cache).advance(cache.pass_ttl + 1)
    again = cache.lookup(b"GET", URL, [])
    assert isinstance(again, Fill) and again.stores and again.leader
    assert again.response(200, [(b"Cache-Control", b"max-age=60")])
    again.feed(b"now cacheable")
    again.finish()
    hit = cache.lookup(b"GET", URL, [])
    assert isinstance(hit, CachedResponse) and hit.body == b"now cacheable"


async def test_waiters_are_released_when_the_leader_fails() -> None:
    cache, upstream = make(), Upstream(fail=True)
    results = await asyncio.gather(
        *(upstream.request(cache) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) for r in results)
    assert upstream.fetches == 4  # the leader, then each waiter on its own
    upstream.fail = False
    assert (await upstream.request(cache))[0] == "MISS"
    assert (await upstream.request(cache))[0] == "HIT"


async def test_waiters_with_another_vary_value_fetch_their_own_variant() -> None:
    cache = make()
    leader = cache.lookup(b"GET", URL, [(b"Accept-Encoding", b"gzip")])
    waiter = cache.lookup(b"GET", URL, [(b"Accept-Encoding", b"br")])
    assert isinstance(leader, Fill) and leader.leader and isinstance(waiter, Wait)
    pending = asyncio.ensure_future(waiter.result())
    leader.response(200, [(b"Cache-Control", b"max-age=60"), (b"Vary", b"accept-encoding")])
    leader.feed(b"gz")
    leader.finish()
    found = await pending
    assert isinstance(found, Fill) and not found.leader


async def test_a_cancelled_waiter_does_not_disturb_the_others() -> None:
    cache = make()
    leader = cache.lookup(b"GET", URL, [])
    assert isinstance(leader, Fill)
    waits = [cache.lookup(b"GET", URL, []) for _ in range(3)]
    tasks = [asyncio.ensure_future(w.result()) for w in waits if isinstance(w, Wait)]
    await asyncio.sleep(0)
    tasks[0].cancel()
    leader.response(200, [(b"Cache-Control", b"max-age=60")])
    leader.feed(b"ok")
    leader.finish()
    done = await asyncio.gather(*tasks[1:])
    assert all(isinstance(d, CachedResponse) and d.body == b"ok" for d in done)


header_values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"max-age=60", b"public, s-maxage=5", b"no-store", b"*", b"accept", b"100", b"-1"]
    ),
    st.datetimes().map(lambda d: http_date(d.replace(tzinfo=UTC).timestamp())),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [b"Cache-Control", b"Expires", b"Date", b"Age", b"Vary", b"Content-Length"]
            ),
            header_values,
        ),
        max_size=6,
    ),
    st.lists(
        st.tuples(
            st.sampled_from([b"Cache-Control", b"Pragma", b"Accept", b"Authorization"]),
            header_values,
        ),
        max_size=4,
    ),
    st.integers(100, 599),
)
def test_arbitrary_headers_never_break_the_cache(
    response: Headers, request: Headers, status: int
) -> None:
    cache = make()
    first = serve(cache, status=status, headers=response, req=request)
    second = serve(cache, status=status, headers=response, req=request)
    assert second[1] == first[1]
    if second[0] == "HIT":  # only what was stored as fresh comes back, with a sane Age
        age = header(second[2], b"age")
        assert age is not None and int(age) >= 0
