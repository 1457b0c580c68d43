"""podkit.net.client.HTTPClient against raw servers that misbehave on purpose: reuse,
deadlines that close the loser's connection, surplus, stale keep-alives, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from podkit.net.client import ConnectError, ConnectTimeout, HTTPClient, ProtocolError
from podkit.net.forward_proxy import ProxySettings
from support import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handle: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw server on a free port: its base URL, and a list that counts connections."""
    opened: list[int] = []

    async def counted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        opened.append(1)
        try:
            await handle(r, w)
        finally:
            w.close()

    srv = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", opened
    finally:
        srv.close()


async def read_head(r: asyncio.StreamReader) -> bytes:
    return await r.readuntil(b"\r\n\r\n")


async def keep_alive(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, head: bytes | None = None
) -> None:
    """Answers each request with its target, on one connection (from `head`, already
    read, when given)."""
    while True:
        if head is None:
            try:
                head = await read_head(r)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
        target = head.split(b" ")[1]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await r.readexactly(length) if length else b""
        answer = target + b" " + body
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(answer), answer))
        await w.drain()
        head = None


async def test_keep_alive_reuses_one_connection_and_sends_bodies() -> None:
    async with server(keep_alive) as (url, opened), HTTPClient() as client:
        for i in range(5):
            r = await client.get(f"{url}/a?i={i}")
            assert (r.status, r.body) == (200, b"/a?i=%d " % i)
        r = await client.post(f"{url}/p", b"payload")
        assert r.body == b"/p payload"
        assert len(opened) == 1


async def test_a_timed_out_request_closes_its_connection() -> None:
    """The loser of a deadline never leaves a late answer for the next request."""

    async def slow_then_fast(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await read_head(r)
        if b"/slow" not in head:
            await keep_alive(r, w, head)
            return
        await asyncio.sleep(0.5)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await w.drain()

    async with server(slow_then_fast) as (url, opened), HTTPClient() as client:
        with pytest.raises(TimeoutError, match="/slow"):
            await client.get(f"{url}/slow", timeout=0.1)
        r = await client.get(f"{url}/next")
        assert r.body == b"/next "  # not "late"
        assert len(opened) == 2  # the timed-out connection was closed, not pooled


async def test_bytes_after_an_answer_close_the_connection() -> None:
    async def surplus(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await read_head(r)
        if b"/a" not in head:
            await keep_alive(r, w, head)
            return
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nPOISON!"
        )
        await w.drain()
        await asyncio.sleep(1)  # the connection stays open: only the client can close it

    async with server(surplus) as (url, opened), HTTPClient() as client:
        assert (await client.get(f"{url}/a")).body == b"ok"
        assert (await client.get(f"{url}/b")).body == b"/b "  # on a new connection
        assert len(opened) == 2


async def test_a_keep_alive_closed_while_idle_is_retried_on_a_new_connection() -> None:
    async def one_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await read_head(r)
        target = head.split(b" ")[1]
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(target), target))
        await w.drain()  # then the handler ends: the connection closes while idle

    async with server(one_then_close) as (url, opened), HTTPClient() as client:
        assert (await client.get(f"{url}/1")).body == b"/1"
        await asyncio.sleep(0.05)
        assert (await client.post(f"{url}/2", b"x")).body == b"/2"
        assert len(opened) == 2


async def drop_the_second(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Answers the first request of a connection; reads the next one and closes unanswered
    (what a server that closes an idle keep-alive as the request comes in looks like)."""
    await keep_alive_once(r, w)
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        await read_head(r)


async def keep_alive_once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    target = (await read_head(r)).split(b" ")[1]
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(target), target))
    await w.drain()


async def test_a_request_lost_on_a_reused_connection_goes_once_more_on_a_new_one() -> None:
    async with server(drop_the_second) as (url, opened), HTTPClient() as client:
        assert (await client.get(f"{url}/1")).body == b"/1"
        assert (await client.get(f"{url}/2")).body == b"/2"  # dropped on the first, resent
        assert len(opened) == 2
        async with client.stream("GET", f"{url}/3") as resp:  # dropped on the second
            assert b"".join([p async for p in resp.iter_body()]) == b"/3"
        assert len(opened) == 3


async def test_a_request_a_live_server_may_have_acted_on_is_not_resent() -> None:
    async def drop(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)  # then closes, unanswered

    async with server(drop) as (url, opened), HTTPClient() as client:
        with pytest.raises(ProtocolError, match="before answering"):
            await client.get(f"{url}/new")  # on a new connection: not a stale keep-alive
        assert len(opened) == 1

    async def cut_the_second(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await keep_alive_once(r, w)
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await w.drain()

    async with server(cut_the_second) as (url, opened), HTTPClient() as client:
        assert (await client.get(f"{url}/1")).body == b"/1"
        with pytest.raises(ProtocolError, match="in the middle of the answer"):
            await client.get(f"{url}/2")  # the server was alive: it may have acted on it
        assert len(opened) == 1


async def test_resend_false_keeps_a_lost_request_from_going_twice() -> None:
    async with server(drop_the_second) as (url, opened), HTTPClient() as client:
        assert (await client.get(f"{url}/1")).body == b"/1"
        with pytest.raises(ProtocolError, match="before answering"):
            await client.post(f"{url}/2", b"write", resend=False)
        assert len(opened) == 1


async def test_a_deadline_passing_before_the_connection_is_a_connect_timeout() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)  # a proxy that never answers CONNECT

    async with server(silent) as (proxy, _):
        settings = ProxySettings(https=proxy)
        async with HTTPClient(proxies=settings, connect_timeout=5) as client:
            with pytest.raises(ConnectTimeout, match="/x: no connection within the deadline"):
                await client.get("https://127.0.0.1:9/x", timeout=0.2)  # a TimeoutError too
        async with HTTPClient(proxies=settings, connect_timeout=0.2) as client:
            with pytest.raises(ConnectError, match=r"no connection to 127\.0\.0\.1:9 through"):
                await client.get("https://127.0.0.1:9/x", timeout=5)


async def test_a_stream_without_deadline_is_ended_by_close_from_another_task() -> None:
    async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(2):
            w.write(b"4\r\ntick\r\n")
            await w.drain()
            await asyncio.sleep(0.05)
        await asyncio.sleep(5)  # then quiet, the connection open

    got: list[bytes] = []
    async with (
        server(endless) as (url, _),
        HTTPClient(timeout=0.1) as client,
        client.stream("GET", f"{url}/watch", timeout=math.inf) as resp,
    ):
        sock = resp.get_extra_info("socket")
        assert sock is not None and resp.get_extra_info("peername") == sock.getpeername()

        async def read() -> None:
            async for piece in resp.iter_body():
                got.append(piece)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.3)  # past the client's own timeout of 0.1 s
        assert not reader.done()
        resp.close()
        with pytest.raises(ProtocolError, match="/watch: the stream was closed"):
            await asyncio.wait_for(reader, 1)
    assert b"".join(got) == b"ticktick"


async def test_streaming_chunked_and_until_close_bodies() -> None:
    async def chunked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            w.write(b"5\r\npart%d\r\n" % i)
            await w.drain()
            await asyncio.sleep(0.02)
        w.write(b"0\r\n\r\n")
        await w.drain()
        await keep_alive(r, w)

    async with server(chunked) as (url, opened), HTTPClient() as client:
        async with client.stream("GET", f"{url}/s") as resp:
            pieces = [p async for p in resp.iter_body()]
        assert b"".join(pieces) == b"part0part1part2" and len(pieces) >= 2
        assert (await client.get(f"{url}/again")).body == b"/again "
        assert len(opened) == 1

    async def until_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await w.drain()

    async with server(until_close) as (url, _), HTTPClient() as client:
        assert (await client.get(f"{url}/c")).body == b"all of it"


async def test_errors_name_the_url() -> None:
    async def cut(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await w.drain()

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"NOT HTTP\r\n\r\n")
        await w.drain()

    async with HTTPClient() as client:
        with pytest.raises(ConnectError, match=r"cannot connect to 127\.0\.0\.1"):
            await client.get(f"http://127.0.0.1:{free_port()}/x")
        async with server(cut) as (url, _):
            with pytest.raises(ProtocolError, match="in the middle of the answer"):
                await client.get(f"{url}/cut")
        async with server(garbage) as (url, _):
            with pytest.raises(ProtocolError, match="/g"):
                await client.get(f"{url}/g")
