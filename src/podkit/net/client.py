"""A pooled HTTP/1.1 client on podkit's own parser (`podkit.net.http.ResponseParser`).

    async with HTTPClient() as client:
        resp = await client.request("GET", "http://127.0.0.1:8080/items", timeout=2.0)
        resp.status, resp.header(b"content-type"), resp.body
        async with client.stream("GET", "http://127.0.0.1:8080/big") as resp:
            async for piece in resp.iter_body():
                ...

- **Pools.** Idle keep-alive connections per host:port, reused last in, first out, at
  most `max_idle` per host. A connection goes back only when its answer ended exactly
  where its bytes did (bytes after an answer, or on an idle connection, close it), the
  server kept it alive, and its body was read to the end.
- **Deadlines.** `timeout` covers the whole request: connect, send, the head and the
  body. A request that times out or is cancelled closes its connection, so a late
  answer can never be read by the next request (this is what lets a fan-out cancel its
  losers). `timeout=math.inf` sets none, for a stream that never ends (a watch); its
  connecting is still bounded by `connect_timeout`.
- **A stale keep-alive connection** (closed by the server while idle) is retried once on
  a new connection when nothing of the answer came, for any method: the request most
  likely never reached a live server. A request that must not run twice (a write that
  is not idempotent) passes `resend=False` and gets the `ProtocolError` instead.
- **TLS.** `https://` URLs verify the server's certificate against the system's CAs.
- **Forward proxies.** `HTTPClient(proxies=ProxySettings.from_environment())` sends
  requests through the proxies `http_proxy` and `https_proxy` name, except to the hosts
  `no_proxy` lists (`podkit.net.forward_proxy`): a plain request with its absolute URL
  as the target, an `https://` one through a `CONNECT` tunnel, with TLS to the origin.
  Without `proxies=`, every request goes directly.
- **Errors.** `ConnectError` (refused, unreachable, connect timeout; `ConnectTimeout`,
  also a `TimeoutError`, when the deadline passes first): the request was not sent.
  `ProtocolError` (an answer that is not valid HTTP/1.1, or a connection closed
  mid-answer), and `TimeoutError` for the deadline: it may have been. Each names the URL.
- **Streaming.** `stream()` hands the answer over at its head; `iter_body()` yields the
  body as it comes, and reading pauses while more than 256 KiB wait unread. `close()`
  ends a stream from anywhere (its reader gets a `ProtocolError`); `get_extra_info()`
  reaches its connection (its socket, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlsplit

from podkit.net.forward_proxy import ForwardProxy, ProxySettings, connect_reply, connect_request
from podkit.net.http import HTTPError, ResponseHead, ResponseParser
from podkit.net.httpwrite import request_head

MAX_BUFFER = 256 * 1024  # unread body bytes of a streamed answer before reading pauses
HeaderPairs = Iterable[tuple[str | bytes, str | bytes]]
Key = tuple[str, int, bool, ForwardProxy | None]  # host, port, TLS, the proxy on the way


class ClientError(Exception):
    """A request failed; the message names the URL and what happened."""


class ConnectError(ClientError):
    """The server could not be reached."""


class ConnectTimeout(ConnectError, TimeoutError):
    """The request's deadline passed before a connection was made."""


class ProtocolError(ClientError):
    """The answer was not valid HTTP/1.1, or the connection ended in the middle of it."""


class Response:
    """A whole answer: `status`, `reason`, `headers` (as sent), `body`."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        """The first header called `name` (lowercase), or None."""
        return next((v for k, v in self.headers if k.lower() == name), None)

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class _Connection(asyncio.Protocol):
    """One connection to a server; parses the answer to the request in hand."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(self)
        self.head: ResponseHead | None = None
        self.parts: list[bytes] = []
        self.buffered = 0
        self.busy = False  # a request is in hand
        self.received = False  # some bytes of the answer came
        self.complete = False
        self.error: ClientError | None = None
        self.changed: asyncio.Event = asyncio.Event()  # head, body, end or error
        self.paused = False
        self.used = False  # served a request before (a stale keep-alive is possible)
        # `request()`'s wait: resolved when the answer is whole or failed (stream() uses
        # `changed` instead)
        self.waiter: asyncio.Future[None] | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # an idle connection must stay silent
            self.close()
            return
        self.received = True
        try:
            self.parser.feed(data)
        except HTTPError as exc:
            self._fail(ProtocolError(exc.detail))
            self.close()
        waiter = self.waiter
        if waiter is not None:
            if (self.complete or self.error is not None) and not waiter.done():
                waiter.set_result(None)
        else:
            self.changed.set()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy and not self.complete:
            head = self.head
            if head is not None and head.until_close:
                self.complete = True  # its body ends when the connection does
            else:
                where = "in the middle of the answer" if self.received else "before answering"
                self._fail(ProtocolError(f"the server closed the connection {where}"))
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.changed.set()

    # ResponseParser callbacks
    def on_response(self, head: ResponseHead) -> None:
        if head.status >= 200:
            self.head = head

    def on_body(self, data: bytes) -> None:
        self.parts.append(data)
        self.buffered += len(data)
        if self.buffered > MAX_BUFFER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_response_end(self) -> None:
        self.complete = True

    # helpers
    def _fail(self, error: ClientError) -> None:
        if self.error is None:
            self.error = error

    def take(self) -> bytes:
        """The body read so far, handed over (reading resumes if it was paused)."""
        data = b"".join(self.parts) if len(self.parts) != 1 else self.parts[0]
        self.parts = []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        head = self.head
        t = self.transport
        return (
            self.complete
            and self.error is None
            and not self.parser.surplus
            and head is not None
            and head.keep_alive
            and not head.until_close
            and t is not None
            and not t.is_closing()
        )

    def start(self, request: bytes, method: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.received = self.complete = False
        self.head = None
        self.error = None
        self.parts = []
        self.buffered = 0
        self.parser.expect(method)
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _may_resend(conn: _Connection, attempt: int) -> bool:
    """Whether a request that failed on `conn` may go once more, on a new connection:
    only after its first try, and only if `conn` was a reused keep-alive that failed
    before any byte of the answer came (the server had closed it while idle)."""
    return attempt == 0 and conn.used and not conn.received


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no whole answer within the deadline"))


def _header_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


class HTTPClient:
    """Pooled keep-alive connections per host; see the module doc."""

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_idle: int = 64,
        proxies: ProxySettings | None = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.proxies = proxies
        self._idle: dict[Key, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def __aenter__(self) -> HTTPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every idle connection; the client takes no more requests."""
        self._closed = True
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: HeaderPairs = (),
        body: bytes = b"",
        timeout: float | None = None,
        resend: bool = True,
    ) -> Response:
        """Send one request and read its whole answer within `timeout` seconds; with
        `resend=False` it is never sent twice (see the module doc)."""
        if self._closed:
            raise ClientError(f"{url}: the client is closed")
        key, wire, m = _encode(method, url, headers, body, self.proxies)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        for attempt in range(2):
            conn = self._take(key)
            if conn is None:
                try:
                    async with asyncio.timeout_at(deadline):
                        conn = await self._connect(key, url)
                except TimeoutError:
                    raise ConnectTimeout(f"{url}: no connection within the deadline") from None
            waiter = conn.waiter = loop.create_future()
            timer = loop.call_at(deadline, _expire, waiter)
            conn.start(wire, m)
            try:
                await waiter
            except BaseException as exc:  # the deadline, or the caller cancelled: cut short
                conn.waiter = None
                conn.close()
                if isinstance(exc, TimeoutError):
                    raise TimeoutError(f"{url}: no whole answer within the deadline") from None
                raise
            finally:
                timer.cancel()
            conn.waiter = None
            error = conn.error
            if error is None:
                head = conn.head
                assert head is not None
                resp = Response(head.status, head.reason, head.headers, conn.take())
                if conn.reusable:
                    conn.busy = False
                    self._release(conn)
                else:
                    conn.close()
                return resp
            conn.close()
            if not (resend and _may_resend(conn, attempt)):
                raise type(error)(f"{url}: {error}")
        raise AssertionError("unreachable")

    async def get(self, url: str, **kw: Any) -> Response:
        return await self.request("GET", url, **kw)

    async def post(self, url: str, body: bytes = b"", **kw: Any) -> Response:
        return await self.request("POST", url, body=body, **kw)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: HeaderPairs = (),
        body: bytes = b"",
        timeout: float | None = None,
    ) -> AsyncIterator[StreamResponse]:
        """The answer at its head; read the body with `iter_body()` inside the block
        (what is left unread when the block ends closes the connection)."""
        if self._closed:
            raise ClientError(f"{url}: the client is closed")
        key, wire, m = _encode(method, url, headers, body, self.proxies)
        deadline = asyncio.get_running_loop().time() + (
            self.timeout if timeout is None else timeout
        )
        conn: _Connection | None = None
        try:
            async with asyncio.timeout_at(deadline):
                conn = await self._send(key, wire, m, url)
                resp = StreamResponse(conn, url)
                yield resp
            if conn.reusable and resp.finished:
                conn.busy = False
                self._release(conn)
                conn = None
        except TimeoutError:
            raise TimeoutError(f"{url}: no whole answer within the deadline") from None
        finally:
            if conn is not None:
                conn.close()  # cut short: never read again by another request

    async def _send(self, key: Key, wire: bytes, method: bytes, url: str) -> _Connection:
        """A connection with the request sent and the answer's head in."""
        for attempt in range(2):
            conn = self._take(key) or await self._connect(key, url)
            conn.start(wire, method)
            while conn.head is None and conn.error is None:
                conn.changed.clear()
                await conn.changed.wait()
            error = conn.error
            if error is None:
                return conn
            conn.close()
            if not _may_resend(conn, attempt):
                raise type(error)(f"{url}: {error}")
        raise AssertionError("unreachable")

    def _take(self, key: Key) -> _Connection | None:
        # The loop of `podkit.net.pool.ConnectionPool.take`, kept here on purpose: that
        # pool holds `PooledConnection`s, and in the compiled build (setup.py) both are
        # mypyc classes, which this interpreted module's `_Connection` cannot subclass;
        # nor could the pool's `connect()` open these connections (TLS, proxies).
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            t = conn.transport
            if t is not None and not t.is_closing():
                return conn
        return None

    async def _connect(self, key: Key, url: str) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port, tls, proxy = key
        context = None
        if tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            context = self._tls
        where = f"{host}:{port}" if proxy is None else f"{host}:{port} through the {proxy}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                if proxy is None:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(key), host, port, ssl=context
                    )
                elif context is None:  # plain HTTP: the proxy takes the request itself
                    _, conn = await loop.create_connection(
                        lambda: _Connection(key), proxy.host, proxy.port
                    )
                else:
                    conn = await _tunnel(key, proxy, context, url)
        except TimeoutError:
            raise ConnectError(
                f"{url}: no connection to {where} within {self.connect_timeout} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConnectError(f"{url}: cannot connect to {where}: {reason}") from None
        return conn

    def _release(self, conn: _Connection) -> None:
        conn.used = True
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= self.max_idle:
            conn.close()
        else:
            idle.append(conn)


class _TunnelOpening(asyncio.Protocol):
    """A connection to a proxy until it answers `CONNECT`."""

    def __init__(self) -> None:
        self.data = b""
        self.reply: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.reply.done():
            return  # bytes after the answer: `_tunnel` refuses them
        try:
            reply = connect_reply(self.data)
        except ValueError as exc:
            self.reply.set_exception(ConnectionError(str(exc)))
            return
        if reply is not None:
            self.reply.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(
                ConnectionError("the proxy closed the connection before answering CONNECT")
            )


async def _tunnel(key: Key, proxy: ForwardProxy, context: ssl.SSLContext, url: str) -> _Connection:
    """A TLS connection to the origin of `key`, through a `CONNECT` tunnel of `proxy`."""
    loop = asyncio.get_running_loop()
    host, port = key[0], key[1]
    transport, opening = await loop.create_connection(_TunnelOpening, proxy.host, proxy.port)
    try:
        transport.write(connect_request(host, port, proxy))
        status, reason = await opening.reply
        if not 200 <= status < 300:
            raise ConnectError(
                f"{url}: the {proxy} answered CONNECT {host}:{port} with {status} {reason}"
            )
        if len(opening.data) != opening.data.find(b"\r\n\r\n") + 4:  # TLS starts here
            raise ConnectError(f"{url}: the {proxy} sent bytes after its answer to CONNECT")
        conn = _Connection(key)
        tls = await loop.start_tls(transport, conn, context, server_hostname=host)
    except BaseException:
        transport.close()
        raise
    assert tls is not None
    conn.connection_made(tls)
    return conn


class StreamResponse:
    """An answer whose body is still coming: `status`, `reason`, `headers`,
    `iter_body()`."""

    def __init__(self, conn: _Connection, url: str) -> None:
        head = conn.head
        assert head is not None
        self._conn = conn
        self.url = url
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self.finished = False  # the body was read to its end

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """What the connection's transport tells (`"socket"`, `"peername"`...)."""
        t = self._conn.transport
        return default if t is None else t.get_extra_info(name, default)

    def close(self) -> None:
        """End the answer here: its connection closes, and `iter_body()`, wherever it
        waits, raises `ProtocolError`."""
        conn = self._conn
        conn._fail(ProtocolError("the stream was closed before its end"))
        conn.close()  # connection_lost wakes the reader

    async def iter_body(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.parts:
                yield conn.take()
                continue
            if conn.error is not None:
                raise ProtocolError(f"{self.url}: {conn.error}")
            if conn.complete:
                self.finished = True
                return
            conn.changed.clear()
            await conn.changed.wait()


_URLS: dict[str, tuple[Key, bytes, bytes]] = {}  # parsed URLs, by text


def _parse_url(url: str) -> tuple[Key, bytes, bytes]:
    """(host, port, TLS, no proxy), the request target and the Host value of `url`
    (memoised)."""
    known = _URLS.get(url)
    if known is not None:
        return known
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"{url}: expected an http:// or https:// URL with a host")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rsplit("@", 1)[-1].encode()
    parsed = (parts.hostname, port, tls, None), target.encode(), host
    if len(_URLS) >= 1024:
        _URLS.clear()
    _URLS[url] = parsed
    return parsed


def _encode(
    method: str, url: str, headers: HeaderPairs, body: bytes, proxies: ProxySettings | None
) -> tuple[Key, bytes, bytes]:
    """(host, port, TLS, proxy), the request's bytes, and its method."""
    key, target, host = _parse_url(url)
    m = method.upper().encode()
    fields = [(b"Host", host)]
    if proxies is not None:
        try:
            proxy = proxies.proxy_for("https" if key[2] else "http", key[0], key[1])
        except ValueError as exc:
            raise ClientError(f"{url}: {exc}") from None
        if proxy is not None:
            key = (key[0], key[1], key[2], proxy)
            if not key[2]:  # plain HTTP: the proxy gets the whole URL as the target
                target = b"http://" + host + target
                if proxy.authorization is not None:
                    fields.append((b"Proxy-Authorization", proxy.authorization))
    fields += [(_header_bytes(k), _header_bytes(v)) for k, v in headers]
    if body or m in (b"POST", b"PUT", b"PATCH"):
        fields.append((b"Content-Length", b"%d" % len(body)))
    return key, request_head(m, target, fields) + body, m
