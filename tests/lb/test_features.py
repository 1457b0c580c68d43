"""`podkit lb` features on real sockets: rate limits, cache, health, breakers, membership,
TLS. Each balancer runs in the test's loop with the filters its flags would install."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from pathlib import Path

import pytest
from lbkit import admin_json, backends, balancer, request

from podkit.backends import open_kv
from podkit.lb.breaker import Limits
from podkit.lb.features import Features, worker_share
from podkit.lb.members import write_members
from podkit.net.proxy.engine import ProxyConfig
from podkit.net.tls import self_signed
from support import free_port

pytestmark = pytest.mark.timeout(60)


# --- rate limits ----------------------------------------------------------------------


async def test_over_the_rate_gets_429_with_retry_after_per_ip() -> None:
    async with (
        backends(1) as bs,
        balancer(Features(rate_limit="5/s burst 5"), [bs[0].url]) as (
            lb,
            w,
        ),
    ):
        codes = [(await request(lb.port, "/a")).status for _ in range(8)]
        assert codes == [200] * 5 + [429] * 3
        limited = await request(lb.port, "/a")
        assert limited.status == 429 and int(limited.headers["retry-after"]) >= 1
        assert bs[0].hits["/a"] == 5  # refused requests never reach the upstream
        # another client address has its own bucket
        assert (await request(lb.port, "/a", local="127.0.0.2")).status == 200
        assert w.rate is not None and w.rate.limiter.limited == 4


async def test_rate_limit_by_header_and_global_bucket() -> None:
    feats = Features(rate_limit="3/s burst 3", rate_limit_by="header:X-Key")
    async with backends(1) as bs, balancer(feats, [bs[0].url]) as (lb, _):
        a = [(await request(lb.port, headers={"X-Key": "a"})).status for _ in range(4)]
        b = [(await request(lb.port, headers={"X-Key": "b"})).status for _ in range(4)]
        assert a == b == [200, 200, 200, 429]
    feats = Features(rate_limit="100/s burst 100", global_rate_limit="4/s burst 4")
    async with backends(1) as bs, balancer(feats, [bs[0].url]) as (lb, _):
        one = [(await request(lb.port)).status for _ in range(2)]
        two = [(await request(lb.port, local="127.0.0.2")).status for _ in range(3)]
        assert one + two == [200, 200, 200, 200, 429]  # all clients share the global bucket


async def test_a_retried_request_is_charged_to_the_rate_limit_once() -> None:
    """With a dead upstream beside a live one, half the first tries fail to connect and
    are retried on the live one: each request still costs one token, not two."""
    dead = f"http://127.0.0.1:{free_port()}"
    feats = Features(rate_limit="5/s burst 5", rate_limit_by="header:X-Key")
    async with backends(1) as bs, balancer(feats, [bs[0].url, dead]) as (lb, _):
        codes = [(await request(lb.port, headers={"X-Key": "k"})).status for _ in range(7)]
        assert codes == [200] * 5 + [429] * 2
        assert bs[0].hits["/"] == 5


def test_workers_divide_the_breaker_limits_so_together_they_hold() -> None:
    feats = Features(max_connections=10, max_pending=3, max_requests=1)
    for workers, want in ((1, Limits(10, 3, 1)), (2, Limits(5, 1, 1)), (4, Limits(2, 1, 1))):
        cfg = ProxyConfig(upstreams=["127.0.0.1:1"], port=0, workers=workers)
        breaker = feats(cfg, 0).breaker
        assert breaker is not None and breaker.limits == want
        # all the workers' shares together stay within the limit
        assert breaker.limits.max_connections * workers <= 10
    assert worker_share(7, 3) == 2 and worker_share(2, 3) == 1 and worker_share(5, 0) == 5


# --- cache ----------------------------------------------------------------------------


async def test_second_get_is_a_hit_without_the_upstream() -> None:
    async with backends(1) as bs, balancer(Features(cache_bytes=1 << 20), [bs[0].url]) as (lb, w):
        first = await request(lb.port, "/cached")
        second = await request(lb.port, "/cached")
        assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
        assert first.body == second.body == b"b0:1"
        assert bs[0].hits["/cached"] == 1
        assert "age" in second.headers
        head = await request(lb.port, "/cached", method="HEAD")
        assert head.status == 200 and head.headers["x-cache"] == "HIT" and head.body == b""
        # a chunked body is stored as it streams, and served with a Content-Length
        assert (await request(lb.port, "/big")).headers["x-cache"] == "MISS"
        big = await request(lb.port, "/big")
        assert big.headers["x-cache"] == "HIT" and big.body == b"x" * 4000
        assert big.headers["content-length"] == "4000"
        assert w.cache is not None and w.cache.cache.stats().hits == 3


async def test_vary_no_store_and_the_entry_cap() -> None:
    feats = Features(cache_bytes=1 << 20, cache_entry_bytes=2000)
    async with backends(1) as bs, balancer(feats, [bs[0].url]) as (lb, _):
        for lang in ("en", "fr", "en", "fr"):
            ans = await request(lb.port, "/vary", headers={"Accept-Language": lang})
            assert ans.body == f"b0:{lang}".encode()
        assert bs[0].hits["/vary"] == 2  # one fetch per variant
        for _ in range(2):
            assert (await request(lb.port, "/nostore")).headers["x-cache"] == "MISS"
        assert bs[0].hits["/nostore"] == 2
        for _ in range(2):  # 4000 bytes: over the 2000-byte cap, streamed but not stored
            assert (await request(lb.port, "/big")).body == b"x" * 4000
        assert bs[0].hits["/big"] == 2


async def test_an_uncacheable_url_passes_through_the_fast_path() -> None:
    """Once a URL answered uncacheable, its answers skip the cache's response reading
    (the proxy's fast path) and still say X-Cache: MISS."""
    from unittest.mock import patch

    import aiohttp

    from podkit.net.proxy.upstreamconn import UpstreamConnection

    feats = Features(cache_bytes=1 << 20)
    full = 0
    on_response = UpstreamConnection.on_response

    def counting(self: UpstreamConnection, head: object) -> None:
        nonlocal full
        full += 1
        on_response(self, head)  # type: ignore[arg-type]

    async with backends(1) as bs, balancer(feats, [bs[0].url]) as (lb, _):
        with patch.object(UpstreamConnection, "on_response", counting):
            async with aiohttp.ClientSession() as s:  # keep-alive, as browsers
                url = f"http://127.0.0.1:{lb.port}/nostore"
                answers = []
                for _ in range(6):
                    async with s.get(url) as resp:
                        answers.append((resp.status, resp.headers["X-Cache"], await resp.text()))
                async with s.get(f"http://127.0.0.1:{lb.port}/cached") as resp:
                    assert resp.headers["X-Cache"] == "MISS"
                async with s.get(f"http://127.0.0.1:{lb.port}/cached") as resp:
                    assert resp.headers["X-Cache"] == "HIT"
    assert answers == [(200, "MISS", f"b0:{i}") for i in range(1, 7)]
    assert bs[0].hits["/nostore"] == 6
    # the first /nostore and the first /cached were read by the cache; the passes were not
    assert full == 2


async def test_twenty_concurrent_misses_make_one_upstream_request() -> None:
    async with backends(1) as bs, balancer(Features(cache_bytes=1 << 20), [bs[0].url]) as (lb, w):
        answers = await asyncio.gather(*[request(lb.port, "/cached?s=0.3") for _ in range(20)])
        assert all(a.status == 200 and a.body == b"b0:1" for a in answers)
        assert bs[0].hits["/cached"] == 1
        assert sorted(a.headers["x-cache"] for a in answers) == ["HIT"] * 19 + ["MISS"]
        assert w.cache is not None and w.cache.cache.stats().coalesced == 19


async def test_a_miss_waiting_for_a_fill_is_answered_once_when_more_requests_follow() -> None:
    """A request waiting on another's fill, with a pipelined request behind it on its
    connection: the waiting one goes through the filters once (one token of the rate
    limit, three in all) and is answered once, then the next one."""
    feats = Features(cache_bytes=1 << 20, rate_limit="1/m burst 3")
    async with backends(1) as bs, balancer(feats, [bs[0].url]) as (lb, _):
        first = asyncio.create_task(request(lb.port, "/cached?s=0.3"))  # the fill
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        try:
            host = f"Host: 127.0.0.1:{lb.port}\r\n".encode()  # the fill's cache key
            writer.write(b"GET /cached?s=0.3 HTTP/1.1\r\n" + host + b"\r\n")  # waits
            await asyncio.sleep(0.05)
            writer.write(b"GET /x HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n")
            answers = await asyncio.wait_for(reader.read(-1), 5)
        finally:
            writer.close()
        assert (await first).status == 200
        parts = answers.split(b"HTTP/1.1 200 OK")[1:]
        assert len(parts) == 2, answers
        assert b"x-cache: hit" in parts[0].lower()  # the waiting one, from the fill, first
        assert bs[0].hits["/cached"] == 1 and bs[0].hits["/x"] == 1


async def test_a_post_and_the_admin_port_purge() -> None:
    feats = Features(cache_bytes=1 << 20, admin_port=0)
    async with backends(1) as bs, balancer(feats, [bs[0].url]) as (lb, w):
        assert w.admin is not None
        key = f"127.0.0.1:{lb.port}/cached"
        await request(lb.port, "/cached")
        assert (await request(lb.port, "/cached")).headers["x-cache"] == "HIT"
        assert await admin_json(w.admin.port, f"/purge?url={key}", "POST") == {"purged": 1}
        assert (await request(lb.port, "/cached")).headers["x-cache"] == "MISS"
        await request(lb.port, "/cached/a")
        await request(lb.port, "/cached/b")
        purged = await admin_json(w.admin.port, f"/purge?url=http://{key}/&prefix=1")
        assert purged == {"purged": 2}
        assert (await request(lb.port, "/cached")).headers["x-cache"] == "HIT"  # not under /cached/
        assert (await request(lb.port, "/cached", method="POST")).status == 200
        assert (await request(lb.port, "/cached")).headers["x-cache"] == "MISS"  # POST purged it
        bad = await request(w.admin.port, "/purge")
        assert bad.status == 400


# --- health ---------------------------------------------------------------------------


async def wait_until(cond: object, timeout: float) -> float:
    """Seconds until `cond()` is true; fails after `timeout`."""
    start = time.monotonic()
    while not cond():  # type: ignore[operator]
        assert time.monotonic() - start < timeout, "condition not reached"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_a_failing_active_check_takes_the_host_out_and_back() -> None:
    feats = Features(
        health_path="/healthz", health_interval=0.1, healthy_threshold=2, unhealthy_threshold=2
    )
    async with backends(2) as bs, balancer(feats, [b.url for b in bs]) as (lb, w):
        up = {u.port: u for u in lb.upstreams}
        await wait_until(lambda: all(u.available for u in lb.upstreams), 2)  # first checks
        bs[1].healthy = False
        out = await wait_until(lambda: not up[bs[1].port].available, 2)
        assert out <= 0.1 * 2 + 0.15  # interval x threshold, plus a check in flight
        before = bs[1].hits["/x"]
        for _ in range(10):
            assert (await request(lb.port, "/x")).status == 200
        assert bs[1].hits["/x"] == before  # no traffic while unhealthy
        bs[1].healthy = True
        back = await wait_until(lambda: up[bs[1].port].available, 2)
        assert back <= 0.1 * 2 + 0.15
        print(
            f"\nactive checks (0.1 s x 2): out after {out * 1000:.0f} ms,"
            f" back after {back * 1000:.0f} ms"
        )
        for _ in range(4):
            await request(lb.port, "/x")
        assert bs[1].hits["/x"] == before + 2
        assert w.health is not None and w.health.checks >= 10


async def test_consecutive_5xx_eject_a_host_passively() -> None:
    feats = Features(passive_health=True, consecutive_5xx=3, max_ejection_percent=50, admin_port=0)
    async with backends(2) as bs, balancer(feats, [b.url for b in bs]) as (lb, w):
        bs[1].failing = True
        codes = [(await request(lb.port, "/x")).status for _ in range(12)]
        assert codes.count(500) == 3  # round-robin: b1's 3rd 5xx in a row ejects it
        assert codes[-6:] == [200] * 6
        assert w.admin is not None
        status = await admin_json(w.admin.port, "/status")
        states = {u["name"]: (u["state"], u["ejections"]) for u in status["upstreams"]}
        assert states[f"127.0.0.1:{bs[1].port}"] == ("ejected", 1)
        assert states[f"127.0.0.1:{bs[0].port}"] == ("healthy", 0)


# --- circuit breaking -----------------------------------------------------------------


async def test_a_slow_upstream_over_max_requests_fails_fast() -> None:
    async with backends(1) as bs, balancer(Features(max_requests=2), [bs[0].url]) as (lb, w):
        start = time.monotonic()

        async def timed() -> tuple[int, float]:
            ans = await request(lb.port, "/slow?s=1")
            return ans.status, time.monotonic() - start

        results = await asyncio.gather(*[timed() for _ in range(6)])
        ok = [t for code, t in results if code == 200]
        refused = [t for code, t in results if code == 503]
        assert len(ok) == 2 and len(refused) == 4
        assert max(refused) < 0.5 < min(ok)  # refused at once, not after the slow answer
        assert w.breaker is not None and w.breaker.breakers[lb.upstreams[0].name].requests == 0


async def test_a_saturated_upstream_does_not_hold_up_the_others() -> None:
    async with (
        backends(2) as bs,
        balancer(Features(max_requests=2), [b.url for b in bs]) as (
            lb,
            _,
        ),
    ):
        bs[0].delay = 1.0
        start = time.monotonic()
        slow = [asyncio.create_task(request(lb.port, "/x")) for _ in range(4)]
        await asyncio.sleep(0.1)  # b0 holds 2 (its limit), b1 answered the other 2
        fast = [await request(lb.port, "/x") for _ in range(10)]  # b0 is full: all go to b1
        assert all(a.status == 200 and a.body.startswith(b"b1") for a in fast), fast
        assert time.monotonic() - start < 0.8
        assert all(a.status == 200 for a in await asyncio.gather(*slow))
        assert bs[0].hits["/x"] == 2


# --- membership -----------------------------------------------------------------------


async def test_members_file_changes_apply_and_a_leaver_is_drained(tmp_path: Path) -> None:
    path = tmp_path / "members"
    async with backends(2) as bs:
        write_members(path, [bs[0].url])
        feats = Features(members_file=str(path), members_interval=0.05)
        async with balancer(feats, []) as (lb, _):
            assert [u.port for u in lb.upstreams] == [bs[0].port]
            write_members(path, [bs[0].url, bs[1].url])
            await wait_until(lambda: len(lb.upstreams) == 2, 2)
            bodies = {(await request(lb.port, "/x")).body[:2] for _ in range(4)}
            assert bodies == {b"b0", b"b1"}
            # a long request on b1, then b1 leaves: it still finishes
            write_members(path, [bs[1].url])
            await wait_until(lambda: len(lb.upstreams) == 1, 2)
            long = asyncio.create_task(request(lb.port, "/slow?s=0.5"))
            await asyncio.sleep(0.1)
            write_members(path, [bs[0].url])
            await wait_until(lambda: [u.port for u in lb.upstreams] == [bs[0].port], 2)
            assert (await request(lb.port, "/x")).body.startswith(b"b0")
            ans = await long
            assert ans.status == 200 and bs[1].hits["/slow"] == 1
            write_members(path, [])  # no members: 503 until some return
            await wait_until(lambda: not lb.upstreams, 2)
            assert (await request(lb.port, "/x")).status == 503


# --- TLS ------------------------------------------------------------------------------


async def test_https_through_the_balancer(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, ["localhost", "127.0.0.1"])
    client = ssl.create_default_context(cafile=str(cert))
    async with (
        backends(1) as bs,
        balancer(Features(tls_cert=str(cert), tls_key=str(key)), [bs[0].url], scheme="https") as (
            lb,
            _,
        ),
    ):
        ans = await request(lb.port, "/headers", tls=client)
        assert ans.status == 200
        assert b'"X-Forwarded-Proto": "https"' in ans.body
        with pytest.raises(ssl.SSLError):  # a client that does not trust it fails the handshake
            await request(lb.port, "/headers", tls=ssl.create_default_context())


async def test_members_from_a_kv_prefix_and_from_dns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    kv = await open_kv(url)
    try:
        async with backends(2) as bs:
            await kv.put("lb/web/a", bs[0].url.encode())
            feats = Features(members_kv=url, members_prefix="lb/web/")
            async with balancer(feats, []) as (lb, _):
                await wait_until(lambda: [u.port for u in lb.upstreams] == [bs[0].port], 5)
                await kv.put("lb/web/b", bs[1].url.encode())
                await wait_until(lambda: len(lb.upstreams) == 2, 5)
                await kv.delete("lb/web/a")
                await wait_until(lambda: [u.port for u in lb.upstreams] == [bs[1].port], 5)
                assert (await request(lb.port, "/x")).body.startswith(b"b1")
            feats = Features(members_dns=f"127.0.0.1:{bs[0].port}")
            async with balancer(feats, []) as (lb, _):
                await wait_until(lambda: len(lb.upstreams) == 1, 5)
                assert (await request(lb.port, "/x")).body.startswith(b"b0")
    finally:
        await kv.close()


async def test_garbage_never_takes_a_featureful_balancer_down() -> None:
    rng = random.Random(7)
    feats = Features(
        cache_bytes=1 << 20, rate_limit="1000/s", passive_health=True, max_requests=50, admin_port=0
    )
    async with backends(1) as bs, balancer(feats, [bs[0].url]) as (lb, w):
        for i in range(40):
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
            if i % 2 == 0:
                blob = b"GET /cached HTTP/1.1\r\nHost: x\r\n" + blob
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            out = b""
            with contextlib.suppress(ConnectionError):
                writer.write(blob)
                writer.write_eof()
                out = await asyncio.wait_for(reader.read(), 5)
            assert out == b"" or out.startswith(b"HTTP/1.1 ")
            writer.close()
        assert (await request(lb.port, "/cached")).status == 200
        assert all(u.inflight == 0 for u in lb.upstreams)
        assert w.breaker is not None
        assert all(b.requests == 0 and b.pending == 0 for b in w.breaker.breakers.values())


async def test_a_stalled_request_body_gets_408() -> None:
    async with backends(1) as bs, balancer(Features(), [bs[0].url], body_timeout=0.3) as (lb, _):
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        out = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert out.startswith(b"HTTP/1.1 408") and b"body stalled" in out, out
        assert time.monotonic() - start < 2
        assert all(u.inflight == 0 for u in lb.upstreams)


async def test_a_miss_answered_without_an_upstream_releases_its_waiters() -> None:
    async with backends(1) as bs, balancer(Features(cache_bytes=1 << 20), [bs[0].url]) as (lb, w):
        for u in lb.upstreams:
            u.available = False  # every miss gets a 503 from the proxy, not an upstream answer
        start = time.monotonic()
        answers = await asyncio.gather(*[request(lb.port, "/cached") for _ in range(5)])
        assert [a.status for a in answers] == [503] * 5
        assert time.monotonic() - start < 1.0
        assert w.cache is not None and not w.cache.cache._inflight  # no fill left behind
        for u in lb.upstreams:
            u.available = True
        assert (await request(lb.port, "/cached")).headers["x-cache"] == "MISS"
        assert (await request(lb.port, "/cached")).headers["x-cache"] == "HIT"
