"""The proxy on real sockets: aiohttp backends behind a LoadBalancer in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from podkit.lb.balancer import LoadBalancer
from podkit.lb.policy import Upstream, parse_upstream
from podkit.net.proxy.engine import Exchange, ProxyConfig
from podkit.net.proxy.hooks import BaseFilter, observes_responses
from podkit.net.proxy.retry import BACKOFF_BASE, BACKOFF_MAX, retry_backoff
from podkit.net.proxy.states import State
from podkit.net.tls import self_signed, server_context
from support import free_port

pytestmark = pytest.mark.timeout(60)


@dataclass
class Backend:
    name: str
    port: int = 0
    runner: web.AppRunner | None = None
    seen: list[dict[str, str]] = field(default_factory=list)
    upload_started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    connections: set[Any] = field(default_factory=set)
    delay: float = 0.0  # seconds /name waits before answering (a slow replica)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def make_app(b: Backend) -> web.Application:
    async def name(request: web.Request) -> web.Response:
        if b.delay:
            await asyncio.sleep(b.delay)
        b.seen.append(dict(request.headers))
        if request.transport is not None:
            b.connections.add(request.transport)
        return web.Response(text=b.name, headers={"X-Backend": b.name})

    async def echo_headers(request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers))

    async def upload(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for piece in request.content.iter_any():
            if n == 0:
                b.upload_started.set()
            h.update(piece)
            n += len(piece)
        return web.json_response({"bytes": n, "sha256": h.hexdigest()})

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("n", "1000000"))
        wait = request.query.get("wait") == "1"
        resp = web.StreamResponse()
        await resp.prepare(request)  # chunked
        piece = b"z" * 65536
        sent = 0
        while sent < size:
            part = piece[: min(len(piece), size - sent)]
            await resp.write(part)
            sent += len(part)
            if wait and sent >= 65536 and not b.release.is_set():
                await b.release.wait()  # the client must see the start before the rest
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "5")))
        return web.Response(text="late")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="x")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str(f"{b.name}:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        return sock

    app = web.Application(client_max_size=1 << 30)
    app.router.add_get("/name", name)
    app.router.add_route("*", "/headers", echo_headers)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/slow", slow)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/ws", ws)
    return app


async def start_backend(name: str, port: int = 0) -> Backend:
    b = Backend(name)
    runner = web.AppRunner(make_app(b), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    b.runner = runner
    b.port = runner.addresses[0][1]
    return b


@asynccontextmanager
async def cluster(
    n: int = 3, **config: Any
) -> AsyncIterator[tuple[LoadBalancer, list[Backend], str]]:
    backends = [await start_backend(f"b{i}") for i in range(n)]
    filters = config.pop("filters", ())
    policy = {k: config.pop(k) for k in ("policy_name", "hash_on") if k in config}
    cfg = ProxyConfig(upstreams=[b.url for b in backends], port=0, tick=0.05, **config)
    lb = LoadBalancer(cfg, filters=filters, **policy)
    await lb.start()
    try:
        yield lb, backends, f"http://127.0.0.1:{lb.port}"
    finally:
        await lb.close(grace=0.5)
        for b in backends:
            if b.runner is not None:
                await b.runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def proxied(handle: Handler, **config: Any) -> AsyncIterator[LoadBalancer]:
    """A LoadBalancer (with `config`) in front of one raw upstream served by `handle`."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lb = LoadBalancer(ProxyConfig(upstreams=[f"127.0.0.1:{port}"], port=0, **config))
    await lb.start()
    try:
        yield lb
    finally:
        await lb.close(0.1)
        server.close()


async def raw(port: int, data: bytes, read_until_close: bool = True, timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(-1), timeout)
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


async def get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, str]:
    async with session.get(url, **kw) as resp:
        return resp.status, await resp.text()


# --- basics -------------------------------------------------------------------------


async def test_round_robin_over_keep_alive_connections() -> None:
    async with cluster(3) as (lb, backends, url):
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn) as s:
            bodies = [(await get(s, url + "/name"))[1] for _ in range(30)]
        assert Counter(bodies) == {"b0": 10, "b1": 10, "b2": 10}
        # one client connection, and each backend saw a single pooled connection
        assert all(len(b.connections) == 1 for b in backends)
        assert all(u.pool is not None and u.pool.opened == 1 for u in lb.upstreams)


async def test_forwarded_headers_and_hop_by_hop_removal() -> None:
    async with cluster(1) as (_, _, url), aiohttp.ClientSession() as s:
        headers = {
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "drop me",
            "Keep-Alive": "timeout=5",
            "X-Kept": "yes",
        }
        async with s.get(url + "/headers", headers=headers) as resp:
            seen = await resp.json()
    assert seen["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Kept"] == "yes"
    assert "X-Secret" not in seen and "Keep-Alive" not in seen
    assert seen.get("Connection", "").lower() not in ("keep-alive, x-secret",)


async def test_pipelined_requests_answer_in_order() -> None:
    async with cluster(3) as (lb, _, _url):
        reqs = b"".join(
            b"GET /name HTTP/1.1\r\nHost: x\r\n%b\r\n"
            % (b"Connection: close\r\n" if i == 5 else b"")
            for i in range(6)
        )
        out = await raw(lb.port, reqs)
    assert out.count(b"HTTP/1.1 200 OK") == 6
    # bodies are b0 b1 b2 b0 b1 b2, in that order
    assert [out.split(b"\r\n\r\n")[i + 1][:2] for i in range(6)] == [
        b"b0",
        b"b1",
        b"b2",
        b"b0",
        b"b1",
        b"b2",
    ]


async def test_http10_client_and_head_request() -> None:
    async with cluster(1) as (lb, _, _):
        out = await raw(lb.port, b"GET /name HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"b0")
        out = await raw(lb.port, b"HEAD /name HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\r\n\r\n")
        # a chunked answer to an HTTP/1.0 client: no chunking, closed at the end
        out = await raw(lb.port, b"GET /download?n=100000 HTTP/1.0\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        assert b"chunked" not in head.lower() and len(body) == 100_000


async def test_status_codes_pass_through() -> None:
    async with cluster(1) as (_, _, url), aiohttp.ClientSession() as s:
        for code in (201, 404, 500, 503):
            assert (await get(s, f"{url}/status/{code}"))[0] == code


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 9_000 + b" HTTP/1.1\r\n\r\n", 414),
    ],
)
async def test_bad_requests_get_their_status_and_a_close(request_bytes: bytes, status: int) -> None:
    async with cluster(1) as (lb, _backends, _):
        out = await raw(lb.port, request_bytes)
        assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
        assert b"Connection: close" in out
        assert b"podkit lb:" in out
        # the smuggled request never reached the backend, and the proxy still serves
        out = await raw(lb.port, b"GET /name HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.endswith(b"b0")


async def test_a_bad_request_after_a_good_one_is_answered_in_order() -> None:
    async with cluster(1) as (lb, _, _):
        out = await raw(lb.port, b"GET /name HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\x01\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    _first, _, rest = out.partition(b"\r\n\r\nb0")
    assert rest.startswith(b"HTTP/1.1 400") and b"Invalid method" in rest


async def test_idle_and_slow_clients_time_out() -> None:
    async with cluster(1, idle_timeout=0.3, header_timeout=0.3) as (lb, _, _):
        start = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # idle: closed
        assert time.monotonic() - start < 2
        writer.close()
        # slow loris: a head that trickles in gets 408, though bytes keep coming
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"GET / HTTP/1.1\r\n")
        for _ in range(10):
            await asyncio.sleep(0.1)
            try:
                writer.write(b"X-A: b\r\n")
            except ConnectionError:
                break
        out = await asyncio.wait_for(reader.read(), 3)
        assert out.startswith(b"HTTP/1.1 408"), out
        writer.close()


# --- failures -----------------------------------------------------------------------


async def test_a_dead_upstream_gives_502_with_a_clear_body() -> None:
    port = free_port()
    lb = LoadBalancer(ProxyConfig(upstreams=[f"http://127.0.0.1:{port}"], port=0, tick=0.05))
    await lb.start()
    try:
        async with aiohttp.ClientSession() as s:
            code, body = await get(s, f"http://127.0.0.1:{lb.port}/x")
        assert code == 502
        assert f"127.0.0.1:{port}" in body and "could not be reached" in body
    finally:
        await lb.close(0.1)


async def test_a_dead_upstream_among_live_ones_costs_no_request() -> None:
    async with cluster(2) as (lb, _backends, url):
        dead = parse_upstream(f"http://127.0.0.1:{free_port()}")
        lb.set_upstreams([*lb.upstreams, dead])
        async with aiohttp.ClientSession() as s:
            results = [await get(s, url + "/name") for _ in range(30)]
        assert all(code == 200 for code, _ in results)
        assert {body for _, body in results} == {"b0", "b1"}


async def test_no_available_upstream_gives_503() -> None:
    async with cluster(2) as (lb, _, url):
        for u in lb.upstreams:
            u.available = False
        async with aiohttp.ClientSession() as s:
            code, body = await get(s, url + "/name")
    assert code == 503 and "no upstream available (2 configured, 0 available)" in body


async def test_a_silent_upstream_gives_504() -> None:
    async with cluster(1, upstream_timeout=0.3) as (_, _, url), aiohttp.ClientSession() as s:
        code, body = await get(s, url + "/slow?s=3")
    assert code == 504 and "did not answer within 0.3 s" in body


async def raw_backend(answer: bytes) -> tuple[asyncio.Server, int]:
    """A backend that reads a request head, sends `answer`, and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_an_upstream_dying_mid_answer_cuts_the_client_off() -> None:
    server, port = await raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10)
    lb = LoadBalancer(ProxyConfig(upstreams=[f"127.0.0.1:{port}"], port=0))
    await lb.start()
    try:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(f"http://127.0.0.1:{lb.port}/") as resp:
                    assert resp.status == 200
                    await resp.read()
    finally:
        await lb.close(0.1)
        server.close()


async def test_an_upstream_closing_before_answering_gives_502() -> None:
    server, port = await raw_backend(b"")
    lb = LoadBalancer(ProxyConfig(upstreams=[f"127.0.0.1:{port}"], port=0))
    await lb.start()
    try:
        async with aiohttp.ClientSession() as s:
            code, body = await get(s, f"http://127.0.0.1:{lb.port}/")
            assert code == 502 and "closed the connection before answering" in body
            async with s.post(f"http://127.0.0.1:{lb.port}/", data=b"x") as resp:
                assert resp.status == 502  # not retried: a POST may have had effects
        assert lb.upstreams[0].inflight == 0
    finally:
        await lb.close(0.1)
        server.close()


async def test_an_invalid_upstream_answer_gives_502() -> None:
    server, port = await raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    lb = LoadBalancer(ProxyConfig(upstreams=[f"127.0.0.1:{port}"], port=0, tries=1))
    await lb.start()
    try:
        async with aiohttp.ClientSession() as s:
            code, body = await get(s, f"http://127.0.0.1:{lb.port}/")
        assert code == 502 and "invalid response" in body
    finally:
        await lb.close(0.1)
        server.close()


async def test_retries_of_requests_sent_stay_within_the_retry_budget() -> None:
    """An upstream that reads every request and hangs up: each GET may be tried 3 times,
    but retries of sent requests add at most 20% (plus the floor, 1 a second here)."""
    heads = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal heads
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            heads += 1
        writer.close()

    async with proxied(handle, tries=3, retry_per_second=1) as lb:
        started = time.monotonic()
        async with aiohttp.ClientSession() as s:
            answers = [await get(s, f"http://127.0.0.1:{lb.port}/") for _ in range(100)]
        elapsed = time.monotonic() - started
        assert all(code == 502 for code, _ in answers)
        spent = [body for _, body in answers if "retry budget is spent" in body]
        retries = heads - 100
        assert 0 < retries <= 0.2 * 100 + 1 * (elapsed + 1), (heads, elapsed)
        assert len(spent) > 50 and lb.retry_rate.refused == len(spent)
        assert "closed the connection before answering" in spent[0]
        # without the budget every GET would have been tried 3 times
        assert heads < 3 * 100 * 0.5


def hang_up_once_upstream() -> tuple[Handler, list[bytes]]:
    """A keep-alive upstream that reads a whole request (any body) and hangs up the
    first time it sees each path; later it answers 200 with the body it got. Its
    handler, and the list of `path body[:20]` it saw."""
    seen: set[bytes] = set()
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":", 1)[1])
                if b"transfer-encoding: chunked" in head.lower():
                    body = b""
                    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                        body += (await reader.readexactly(size + 2))[:-2]
                    await reader.readuntil(b"\r\n")  # the end of the last chunk
                    n = len(body)
                else:
                    body = await reader.readexactly(n)
                got.append(path + b" " + body[:20])
                if path not in seen:
                    seen.add(path)
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (n, body))
        writer.close()

    return handle, got


async def test_a_request_with_a_body_is_retried_with_it_when_idempotent_or_marked() -> None:
    handle, got = hang_up_once_upstream()
    async with proxied(handle) as lb:
        url = f"http://127.0.0.1:{lb.port}"
        async with aiohttp.ClientSession() as s:
            # PUT is idempotent: its body was kept, and goes again on the retry
            assert await request_with(s, "PUT", f"{url}/put", b"hello") == (200, b"hello")
            # a POST the client marks retryable, in chunks (the body streams through)
            marked = {"x-podkit-retry": "1"}

            async def pieces() -> AsyncIterator[bytes]:
                for part in (b"abc", b"def"):
                    yield part

            async with s.post(f"{url}/marked", data=pieces(), headers=marked) as resp:
                assert (resp.status, await resp.read()) == (200, b"abcdef")
            # an unmarked POST is not sent twice
            code, body = await request_with(s, "POST", f"{url}/post", b"once")
            assert code == 502 and b"closed the connection before answering" in body
            # a body over the replay limit is not kept: not retried either
            big = b"x" * (64 * 1024 + 1)
            assert (await request_with(s, "PUT", f"{url}/big", big))[0] == 502
        assert got.count(b"/put hello") == 2 and got.count(b"/post once") == 1
        assert got.count(b"/marked abcdef") == 2
        assert got.count(b"/big " + b"x" * 20) == 1


async def test_a_malformed_body_ends_the_request_with_400_and_frees_the_upstream() -> None:
    upstream_saw_eof = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):  # the head, then waits for the body
                pass
            upstream_saw_eof.set()
        writer.close()

    async with proxied(handle) as lb:
        for sent_apart in (False, True):
            upstream_saw_eof.clear()
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            if sent_apart:  # the head has reached the upstream before the bad chunk
                writer.write(head)
                await asyncio.sleep(0.2)
                head = b""
            writer.write(head + b"zz\r\nabc\r\n0\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 2.0)  # to the close
            assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1") == 1
            writer.close()
            if sent_apart:
                await asyncio.wait_for(upstream_saw_eof.wait(), 2.0)


def test_retry_backoff_doubles_is_capped_and_jittered_within_half() -> None:
    for tries in range(1, 12):
        ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (tries - 1))
        for draw in (0.0, 0.3, 0.999):
            assert ceiling / 2 <= retry_backoff(tries, draw) <= ceiling
    assert retry_backoff(1, 0.0) == BACKOFF_BASE / 2 and retry_backoff(20, 0.999) < BACKOFF_MAX


async def test_a_retry_to_an_upstream_already_tried_backs_off() -> None:
    arrivals: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                arrivals.append(time.monotonic())
                if len(arrivals) < 3:
                    break  # the first two tries: hang up without an answer
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        writer.close()

    async with proxied(handle, tries=3) as lb, aiohttp.ClientSession() as s:
        assert await get(s, f"http://127.0.0.1:{lb.port}/") == (200, "ok")
    # the only upstream was tried each time: 12.5-25 ms, then 25-50 ms between tries
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 3 and gaps[0] >= BACKOFF_BASE / 2 and gaps[1] >= BACKOFF_BASE


async def test_a_request_waiting_to_retry_is_not_sent_again_by_more_client_bytes() -> None:
    """While a retry waits out its back-off, a pipelined request arriving behind it must
    neither send the waiting one early nor twice."""
    seen: list[tuple[bytes, float]] = []
    hung_up = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                path = (await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1]
                seen.append((path, time.monotonic()))
                if path == b"/a" and not hung_up.is_set():
                    hung_up.set()
                    break  # the first try of /a: hang up without an answer
                await asyncio.sleep(0.1)  # slow: a second send would come while this runs
                body = b"ok " + path
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        writer.close()

    async with proxied(handle, tries=3) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        try:
            writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(hung_up.wait(), 2)
            await asyncio.sleep(0.005)  # the balancer sees the hang-up; back-off >= 12.5 ms
            writer.write(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers = await asyncio.wait_for(reader.read(-1), 5)
        finally:
            writer.close()
    assert answers.count(b"HTTP/1.1 200 OK") == 2 and answers.index(b"ok /a") < answers.index(
        b"ok /b"
    )
    assert [path for path, _ in seen] == [b"/a", b"/a", b"/b"]
    assert seen[1][1] - seen[0][1] >= BACKOFF_BASE / 2  # the back-off was kept


async def request_with(
    s: aiohttp.ClientSession, method: str, url: str, body: bytes
) -> tuple[int, bytes]:
    async with s.request(method, url, data=body) as resp:
        return resp.status, await resp.read()


async def test_the_request_timeout_bounds_all_tries_together() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read(65536)  # and never answer
            await asyncio.sleep(30)
        writer.close()

    cfg = {"tick": 0.05, "upstream_timeout": 0.3, "request_timeout": 0.8, "tries": 10}
    async with proxied(handle, **cfg) as lb, aiohttp.ClientSession() as s:
        started = time.monotonic()
        code, body = await get(s, f"http://127.0.0.1:{lb.port}/")
        elapsed = time.monotonic() - started
    # per-try timeouts of 0.3 s were retried (GET), until the overall 0.8 s ran out
    assert code == 504 and "no answer within 0.8 s (3 tries)" in body, body
    assert 0.75 < elapsed < 1.5


async def test_the_request_timeout_starts_once_the_request_is_all_read() -> None:
    """A slow upload is the body timeout's business: the overall deadline starts when the
    request is complete, so a 1 s upload under a 0.5 s request timeout still succeeds."""
    handle, got = hang_up_once_upstream()
    async with proxied(handle, tick=0.05, request_timeout=0.5) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        for _ in range(2):  # the first time the backend hangs up: a retry, with the body
            writer.write(b"PUT /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
            await asyncio.sleep(1.0)
            writer.write(b"cd")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert await reader.readexactly(4) == b"abcd"
        writer.close()
        assert got.count(b"/slow abcd") == 3


# --- streaming ----------------------------------------------------------------------


async def test_a_large_upload_streams_through() -> None:
    async with cluster(1) as (_, backends, url):
        b = backends[0]
        total = 24 * 1024 * 1024
        piece = os.urandom(256 * 1024)
        h = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            while sent < total:
                if sent == 4 * len(piece):
                    # the backend has the start before the rest is even produced:
                    # the proxy did not wait for the whole body
                    await asyncio.wait_for(b.upload_started.wait(), 5)
                h.update(piece)
                yield piece
                sent += len(piece)

        async with aiohttp.ClientSession() as s, s.post(url + "/upload", data=body()) as resp:
            result = await resp.json()
    assert result == {"bytes": total, "sha256": h.hexdigest()}


async def test_a_large_download_streams_through() -> None:
    async with cluster(1) as (_, backends, url):
        b = backends[0]
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/download?n=20000000&wait=1") as resp:
                first = await asyncio.wait_for(resp.content.readexactly(65536), 5)
                assert first == b"z" * 65536  # arrived while the backend holds the rest
                b.release.set()
                n = len(first)
                async for piece in resp.content.iter_any():
                    n += len(piece)
            assert n == 20_000_000
            # the same keep-alive connection works afterwards
            assert (await get(s, url + "/name"))[1] == "b0"


async def test_a_slow_reader_holds_the_upstream_back() -> None:
    """Backpressure: with a client that stops reading, the proxy does not buffer it all."""
    async with cluster(1) as (lb, _backends, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"GET /download?n=200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.read(1000)
        await asyncio.sleep(0.5)  # the client reads nothing more
        client = next(iter(lb.clients))
        transport = client.transport
        assert transport is not None
        assert transport.get_write_buffer_size() < 8 * 1024 * 1024
        writer.close()


async def narrow_client(lb: LoadBalancer) -> tuple[socket.socket, asyncio.Transport]:
    """A non-blocking client socket whose connection holds little in the kernel (4 KiB
    buffers both ways), so what it does not read stays in the proxy's transport."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", lb.port))
    sock.setblocking(False)
    while not lb.clients:
        await asyncio.sleep(0.01)
    transport = next(iter(lb.clients)).transport
    assert transport is not None
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return sock, transport


@pytest.mark.parametrize("size", [200_000_000, 60_000], ids=["streaming", "all-buffered"])
@pytest.mark.parametrize("closing", [False, True], ids=["keep-alive", "connection-close"])
async def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(
    closing: bool, size: int
) -> None:
    """Its connection is dropped once it has taken nothing for --send-timeout: while the
    answer streams (writes held back), and when all of it is already in the proxy's
    buffer (the connection idle, or lingering until the buffer drains)."""

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        with contextlib.suppress(ConnectionError):
            for at in range(0, size, 100_000):
                w.write(b"z" * min(100_000, size - at))
                await w.drain()
            await r.read()

    async with proxied(upstream, send_timeout=0.5, tick=0.05) as lb:
        sock, _ = await narrow_client(lb)
        close = b"Connection: close\r\n" if closing else b""
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n")
        start = time.monotonic()
        await asyncio.sleep(0.2)
        assert lb.clients
        while lb.clients:  # the client reads nothing
            assert time.monotonic() - start < 5, "a client that reads nothing is kept"
            await asyncio.sleep(0.05)
        assert time.monotonic() - start > 0.4
        sock.close()


async def test_a_slow_client_that_keeps_reading_a_growing_answer_is_not_cut_off() -> None:
    """The upstream streams faster than the client reads, so the bytes waiting for the
    client grow from one sweep to the next, though the client takes some all the time:
    it is not a client that takes none of them, and is kept past --send-timeout."""

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                w.write(b"z" * 8192)
                await w.drain()
                await asyncio.sleep(0.02)

    async with proxied(upstream, send_timeout=0.5, tick=0.05) as lb:
        sock, transport = await narrow_client(lb)
        transport.set_write_buffer_limits(high=16 * 1024 * 1024)  # writes never held back
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        taken = 0
        start = time.monotonic()
        while time.monotonic() - start < 1.5:  # three send timeouts
            await asyncio.sleep(0.02)
            with contextlib.suppress(BlockingIOError):
                chunk = sock.recv(4096)  # half what the upstream sends
                assert chunk, f"cut off after {time.monotonic() - start:.2f} s, {taken} taken"
                taken += len(chunk)
        assert lb.clients and taken > 100_000
        sock.close()


async def test_failed_answers_are_logged_the_first_at_once_then_counted(
    capfd: pytest.CaptureFixture[str],
) -> None:
    port = free_port()  # nothing listens there
    # no sweep during the test: its clock (lb.now) stays put, so the window is the test's
    cfg = ProxyConfig(upstreams=[f"127.0.0.1:{port}"], port=0, tries=1, tick=60)
    lb = LoadBalancer(cfg)
    await lb.start()
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    try:
        for _ in range(4):
            assert (await raw(lb.port, request)).startswith(b"HTTP/1.1 50")
        logged = [line for line in capfd.readouterr().err.splitlines() if "answered" in line]
        assert len(logged) == 1, logged
        assert logged[0].startswith(f"lb: answered 502: upstream 127.0.0.1:{port} could not be")
        lb.next_report = 0.0  # as if REPORT_EVERY had passed
        assert (await raw(lb.port, request)).startswith(b"HTTP/1.1 50")
        logged = [line for line in capfd.readouterr().err.splitlines() if "answered" in line]
        assert len(logged) == 1 and logged[0].startswith("lb: answered 50")
        assert logged[0].endswith("(and 3 more since the last report)")  # 4 in the window
    finally:
        await lb.close(0.1)


async def test_failed_answers_not_logged_are_reported_even_if_no_other_follows(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A burst of 502s, then none: the ones counted are still logged once REPORT_EVERY
    has passed (they used to wait for a next failure, which may never come)."""
    port = free_port()  # nothing listens there
    lb = LoadBalancer(ProxyConfig(upstreams=[f"127.0.0.1:{port}"], port=0, tries=1, tick=0.05))
    await lb.start()
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    try:
        for _ in range(4):
            assert (await raw(lb.port, request)).startswith(b"HTTP/1.1 50")
        capfd.readouterr()
        lb.next_report = 0.0  # as if REPORT_EVERY had passed; no failure follows
        await asyncio.sleep(0.2)
        logged = [line for line in capfd.readouterr().err.splitlines() if "answered" in line]
        assert len(logged) == 1, logged
        assert logged[0].startswith(f"lb: answered 502: upstream 127.0.0.1:{port}")
        assert logged[0].endswith("(and 2 more since the last report)")  # 3 unlogged
    finally:
        await lb.close(0.1)


# --- WebSocket ----------------------------------------------------------------------


async def test_websocket_upgrade_tunnel() -> None:
    async with cluster(2) as (lb, _, url), aiohttp.ClientSession() as s:
        async with s.ws_connect(url + "/ws") as ws:
            await ws.send_str("hello")
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.TEXT
            who, _, text = msg.data.partition(":")
            assert who in ("b0", "b1") and text == "hello"
            await ws.send_bytes(b"\x00\x01\x02" * 50_000)
            msg = await ws.receive(timeout=5)
            assert msg.data == (b"\x00\x01\x02" * 50_000)[::-1]
        assert all(u.inflight == 0 for u in lb.upstreams)


async def test_upgrade_refused_by_the_upstream_is_forwarded() -> None:
    async with cluster(1) as (lb, _, _):
        out = await raw(
            lb.port,
            b"GET /name HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
    assert out.startswith(b"HTTP/1.1 200") and b"Connection: close" in out


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_tunnel_carries_the_clients_side_after_the_upstream_ends_its_own(
    tls: bool, tmp_path: Path
) -> None:
    """The upstream answers 101, sends a last word and half-closes; what the client sends
    after that, and its end, still reach the upstream (over TLS: close_notify and FIN
    towards the client, its side still read)."""

    got = bytearray()
    ended = asyncio.Event()

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nbye")
        await w.drain()
        w.write_eof()
        while data := await r.read(1000):
            got.extend(data)
        ended.set()
        w.close()

    srv = await asyncio.start_server(upstream, "127.0.0.1", 0)
    cert, key = self_signed(tmp_path, ["localhost"])
    lb = LoadBalancer(
        ProxyConfig(upstreams=[f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"], port=0)
    )
    await lb.start(ssl=server_context(cert, key) if tls else None)

    def client() -> bytes:
        sock: socket.socket = socket.create_connection(("127.0.0.1", lb.port), timeout=5)
        if tls:
            ctx = ssl.create_default_context(cafile=str(cert))
            sock = ctx.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)
        with sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(1000):  # to the upstream's end, clean over TLS
                answer += chunk
            sock.sendall(b"client still talks")
            if isinstance(sock, ssl.SSLSocket):
                sock = sock.unwrap()
            sock.shutdown(socket.SHUT_WR)
            return answer

    try:
        answer = await asyncio.to_thread(client)
        assert answer.startswith(b"HTTP/1.1 101") and answer.endswith(b"bye")
        await asyncio.wait_for(ended.wait(), 5)
        assert bytes(got) == b"client still talks"
    finally:
        await lb.close(0.5)
        srv.close()


# --- policies through the proxy -----------------------------------------------------


async def test_weighted_distribution() -> None:
    backends = [await start_backend(f"w{i}") for i in range(2)]
    cfg = ProxyConfig(upstreams=[backends[0].url + ",weight=3", backends[1].url], port=0)
    lb = LoadBalancer(cfg, policy_name="weighted")
    await lb.start()
    try:
        async with aiohttp.ClientSession() as s:
            bodies = [(await get(s, f"http://127.0.0.1:{lb.port}/name"))[1] for _ in range(40)]
        assert Counter(bodies) == {"w0": 30, "w1": 10}
    finally:
        await lb.close(0.1)
        for b in backends:
            assert b.runner is not None
            await b.runner.cleanup()


async def test_least_requests_avoids_the_busy_upstream() -> None:
    async with cluster(2, policy_name="least-requests") as (lb, _, url):
        async with aiohttp.ClientSession() as s:
            busy = lb.upstreams[0]
            busy.inflight += 100  # as if 100 requests were stuck there
            bodies = [(await get(s, url + "/name"))[1] for _ in range(20)]
            busy.inflight -= 100
        assert Counter(bodies) == {"b1": 20}


async def test_a_slow_replica_loses_traffic_under_least_requests() -> None:
    async with cluster(2, policy_name="least-requests") as (_, backends, url):
        backends[0].delay = 0.05
        counts: Counter[str] = Counter()
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as s:

            async def client() -> None:
                while not stop.is_set():
                    counts[(await get(s, url + "/name"))[1]] += 1

            tasks = [asyncio.create_task(client()) for _ in range(8)]
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
        # round-robin would give the slow one half; least-requests gives it a trickle
        assert counts["b1"] > 4 * counts["b0"], counts


async def test_consistent_hash_keeps_sessions_when_another_replica_leaves() -> None:
    async with cluster(4, policy_name="consistent-hash", hash_on="header:X-Session") as (
        lb,
        _,
        url,
    ):
        async with aiohttp.ClientSession() as s:

            async def where(key: str) -> str:
                return (await get(s, url + "/name", headers={"X-Session": key}))[1]

            keys = [f"user-{i}" for i in range(60)]
            before = {k: await where(k) for k in keys}
            assert len(set(before.values())) == 4
            assert [await where(k) for k in keys[:10]] == [before[k] for k in keys[:10]]
            leaving = lb.upstreams[1]
            leaving_name = "b1"
            lb.set_upstreams([u for u in lb.upstreams if u is not leaving])
            after = {k: await where(k) for k in keys}
        moved = {k for k in keys if before[k] != after[k]}
        assert moved == {k for k in keys if before[k] == leaving_name}
        assert all(after[k] != leaving_name for k in keys)


# --- the pipeline hook points -------------------------------------------------------


class Recorder(BaseFilter):
    def __init__(self) -> None:
        self.done: list[tuple[str, int | None, str | None]] = []

    def on_request(self, ex: Exchange) -> bytes | Awaitable[bytes | None] | None:
        if ex.head.target == b"/limited":
            return b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"
        if ex.head.target == b"/wait-then-answer":
            return self.later(b"HTTP/1.1 200 OK\r\nX-Cache: HIT\r\nContent-Length: 3\r\n\r\nhit")
        if ex.head.target == b"/name?wait":
            return self.later(None)
        return None

    async def later(self, answer: bytes | None) -> bytes | None:
        await asyncio.sleep(0.05)  # like a request coalesced onto a cache fill
        return answer

    def admit(self, ex: Exchange, upstream: Upstream) -> bool:
        return upstream.name.endswith(str(self.allowed_port))

    def on_done(
        self, ex: Exchange, upstream: Upstream, status: int | None, error: str | None
    ) -> None:
        self.done.append((upstream.name, status, error))

    allowed_port = 0


async def test_filters_answer_locally_admit_and_observe() -> None:
    rec = Recorder()
    async with cluster(2, filters=[rec]) as (_lb, backends, url):
        rec.allowed_port = backends[1].port
        async with aiohttp.ClientSession() as s:
            assert (await get(s, url + "/limited"))[0] == 429
            assert await get(s, url + "/wait-then-answer") == (200, "hit")
            bodies = [(await get(s, url + "/name"))[1] for _ in range(3)]
            bodies.append((await get(s, url + "/name?wait"))[1])
        assert bodies == ["b1"] * 4  # the breaker-like admit refused b0
        assert rec.done == [(f"127.0.0.1:{backends[1].port}", 200, None)] * 4


def test_only_filters_that_read_responses_take_answers_off_the_fast_path() -> None:
    """Status-only filters (health, timing, breakers, rate limits) keep whole answers on
    the fast path; a filter with its own on_response (a cache) does not."""
    from podkit.lb.breaker import Limits
    from podkit.lb.filters import BreakerFilter, CacheFilter, RateLimitFilter, Timing

    class AddsHeader(BaseFilter):
        def on_response(self, ex: Exchange, head: Any) -> None:
            head.headers.append((b"X-Seen", b"1"))

    assert not observes_responses(Recorder())
    assert not observes_responses(Timing(lambda *_: None))
    assert not observes_responses(BreakerFilter(Limits(10, 10, 10)))
    assert observes_responses(AddsHeader())
    assert CacheFilter.on_response is not BaseFilter.on_response  # so a cache observes
    assert RateLimitFilter.on_response is BaseFilter.on_response


async def test_a_response_filter_still_sees_every_answer() -> None:
    class AddsHeader(BaseFilter):
        def on_response(self, ex: Exchange, head: Any) -> None:
            head.headers.append((b"X-Seen", b"1"))

    async with (
        cluster(2, filters=[AddsHeader()]) as (_lb, _backends, url),
        aiohttp.ClientSession() as s,
    ):
        for _ in range(4):
            async with s.get(url + "/name") as r:
                assert r.status == 200 and r.headers.get("X-Seen") == "1"


# --- the command --------------------------------------------------------------------


async def test_podkit_lb_command_with_two_workers() -> None:
    backends = [await start_backend(f"c{i}") for i in range(2)]
    port = free_port()
    cmd = [sys.executable, "-m", "podkit", "lb", "--listen", f"127.0.0.1:{port}", "--workers", "2"]
    for b in backends:
        cmd += ["--upstream", b.url]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 10
            while True:
                try:
                    _code, _ = await get(s, f"http://127.0.0.1:{port}/name")
                    break
                except aiohttp.ClientError:
                    assert time.monotonic() < deadline, "podkit lb did not start"
                    await asyncio.sleep(0.1)
            results = await asyncio.gather(
                *[get(s, f"http://127.0.0.1:{port}/name") for _ in range(40)]
            )
        assert {body for _, body in results} == {"c0", "c1"}
        assert all(code == 200 for code, _ in results)
        workers = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) >= 2
    finally:
        proc.terminate()
        _, err = await asyncio.to_thread(proc.communicate, timeout=10)
        for b in backends:
            assert b.runner is not None
            await b.runner.cleanup()
    assert proc.returncode == 0, err.decode()
    assert b"2 workers" in err


def test_podkit_lb_flags_are_checked() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "podkit", "lb", "--upstream", "ftp://x:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "only http:// upstreams" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "podkit", "lb", "--upstream", "x:1", "--policy", "random"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "choose one of" in out.stderr


# --- faults ---------------------------------------------------------------------------


async def test_kill_9_of_a_replica_under_load_fails_no_get() -> None:
    app = Path(__file__).resolve().parents[1] / "apps" / "web.py"
    ports = [free_port() for _ in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(app), "127.0.0.1", str(p)],
            env={**os.environ, "POD_NAME": f"r{i}"},
        )
        for i, p in enumerate(ports)
    ]
    lb = LoadBalancer(ProxyConfig(upstreams=[f"127.0.0.1:{p}" for p in ports], port=0))
    await lb.start()
    url = f"http://127.0.0.1:{lb.port}/"
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 10
            while {(await get(s, url))[1] for _ in range(6)} != {"r0", "r1", "r2"}:
                assert time.monotonic() < deadline, "replicas did not start"
                await asyncio.sleep(0.1)
            results: Counter[str] = Counter()
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    code, body = await get(s, url)
                    results[body if code == 200 else f"HTTP {code}"] += 1

            tasks = [asyncio.create_task(client()) for _ in range(16)]
            await asyncio.sleep(0.5)
            procs[1].kill()  # kill -9 in the middle of the load
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
        assert all(k in ("r0", "r1", "r2") for k in results), results
        assert results["r0"] > 50 and results["r2"] > 50
    finally:
        await lb.close(0.1)
        for p in procs:
            p.kill()
            p.wait()


async def test_random_bytes_never_take_the_proxy_down() -> None:
    rng = random.Random(5)
    async with cluster(1) as (lb, _, url):
        for i in range(60):
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 400)))
            if i % 3 == 0:  # a valid start, then garbage
                blob = b"GET / HTTP/1.1\r\nHost: x\r\n" + blob
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            writer.write(blob)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.write_eof()
            out = await asyncio.wait_for(reader.read(), 5)
            assert out == b"" or out.startswith(b"HTTP/1.1 ")
            writer.close()
        async with aiohttp.ClientSession() as s:
            assert await get(s, url + "/name") == (200, "b0")
        assert all(u.inflight == 0 for u in lb.upstreams)


async def test_repeated_heads_are_remembered_and_still_correct() -> None:
    async with cluster(2) as (lb, _, _):
        req = b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n"
        plain = b"GET /name HTTP/1.1\r\nHost: x\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        bodies = []
        for data in (plain, plain, req, req, plain):
            writer.write(data)  # one request per read: each may be remembered
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            bodies.append(await reader.readexactly(length))
        assert bodies[0:2] == [b"b0", b"b1"] and bodies[4] == b"b0"  # still round-robin
        for body in bodies[2:4]:  # still X-Forwarded-For with this client appended
            assert b'"X-Forwarded-For": "198.51.100.1, 127.0.0.1"' in body
        assert plain in lb.request_heads and req in lb.request_heads
        # a remembered head that asks to close still closes
        close = b"GET /name HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for _ in range(2):
            out = await raw(lb.port, close)
            assert out.startswith(b"HTTP/1.1 200") and b"Connection: close" in out
        assert close in lb.request_heads
        # bad bytes are never remembered: each time they get their 400
        bad = b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"
        for _ in range(2):
            assert (await raw(lb.port, bad)).startswith(b"HTTP/1.1 400")
        assert bad not in lb.request_heads
        writer.close()


async def test_trailer_fields_are_forwarded_as_trailers_never_as_headers() -> None:
    """A client's trailers reach the upstream after the body, not in its head; an
    upstream's trailers reach an HTTP/1.1 client in the last chunk."""
    got: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while not data.endswith(b"\r\n\r\n") or data.count(b"\r\n\r\n") < 2:
            piece = await reader.read(4096)
            if not piece:
                break
            data += piece
        got.append(data)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\nX-Checksum: 123\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async with proxied(upstream) as lb:
        answer = await raw(
            lb.port,
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: abc\r\nHost: evil\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\n\r\n",
        )
    head, _, body = got[0].partition(b"\r\n\r\n")
    assert b"X-Sum" not in head and b"evil" not in head and b"6.6.6.6" not in head
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in head
    assert body == b"5\r\nhello\r\n0\r\nX-Sum: abc\r\n\r\n"  # no forged X-Forwarded-For
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\n2\r\nok\r\n0\r\nX-Checksum: 123\r\n\r\n")


async def test_a_client_connection_names_its_state_as_a_request_goes_through() -> None:
    go_on = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(4)
        await go_on.wait()
        go_on.clear()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
        await writer.drain()
        await go_on.wait()
        writer.write(b"k")
        await writer.drain()
        await reader.read()

    async def reaches(want: State) -> None:
        deadline = time.monotonic() + 5
        while (state := [c.state for c in lb.clients]) != [want]:
            assert time.monotonic() < deadline, f"{state}, not {want}"
            await asyncio.sleep(0.01)

    async with proxied(upstream) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        await reaches(State.IDLE)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n")
        await reaches(State.READING_HEAD)
        writer.write(b"Content-Length: 4\r\n\r\nab")
        await reaches(State.READING_BODY)
        writer.write(b"cd")
        await reaches(State.WAITING_UPSTREAM)
        go_on.set()
        await reaches(State.STREAMING)
        go_on.set()
        assert (await reader.readuntil(b"\r\n\r\nok")).startswith(b"HTTP/1.1 200 OK\r\n")
        await reaches(State.IDLE)
        writer.write(b"BAD\r\n\r\n")
        await reaches(State.LINGERING)
        writer.close()
