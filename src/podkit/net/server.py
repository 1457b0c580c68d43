"""A small HTTP/1.1 server on podkit's own parser, for control endpoints: admin pages, a
queue's HTTP source. Not a data path: one request at a time per connection, bodies read
whole (up to `max_body`).

    async def handle(req: Request) -> Response:
        return Response(200, b'{"ok": true}')

    server = HTTPServer(handle, "127.0.0.1", 0)
    await server.start()          # server.port is the one bound

Framing is `podkit.net.http.RequestParser`'s: keep-alive and pipelining, bodies by
Content-Length or chunked (an answer to HEAD is its head alone, with the Content-Length
of the body a GET would get), and bad input answered with its status (400 malformed or
an invalid Content-Length, 413 a body over `max_body`, 431 headers too large, 501 a
transfer coding other than chunked, 505 HTTP/2) and a one-line body naming what was
wrong, then the connection closes. A handler that raises gets a 500, logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from podkit.aio import wait_for
from podkit.net.http import HTTPError, RequestHead, RequestParser
from podkit.net.httpwrite import response_head

CONTINUE = response_head(100)  # the interim answer to `Expect: 100-continue`
MAX_BODY = 16 << 20


@dataclass(slots=True)
class Request:
    """A whole request: its head, and its body read to the end."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool = True

    @property
    def path(self) -> str:
        """The target without its query, as text."""
        return self.target.split(b"?", 1)[0].decode("latin-1")

    @property
    def query(self) -> str:
        """The target's query (after `?`) as text, still encoded; "" when there is none."""
        parts = self.target.split(b"?", 1)
        return parts[1].decode("latin-1") if len(parts) == 2 else ""

    def header(self, name: bytes) -> bytes | None:
        """The first header called `name` (lowercase), or None."""
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


class _Reader:
    """RequestParser callbacks: whole requests in a deque; the body size checked."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.done: deque[Request] = deque()
        self.head: RequestHead | None = None
        self.parts: list[bytes] = []
        self.size = 0
        self.expects = False  # the client waits for 100 Continue before its body

    def on_request(self, head: RequestHead) -> None:
        if head.content_length is not None and head.content_length > self.max_body:
            raise HTTPError(413, f"body of {head.content_length} bytes: over {self.max_body}")
        self.head, self.parts, self.size = head, [], 0
        expect = head.header(b"expect")
        self.expects = expect is not None and expect.strip().lower() == b"100-continue"

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_body:
            raise HTTPError(413, f"body over {self.max_body} bytes")
        self.parts.append(data)

    def on_request_end(self) -> None:
        h = self.head
        assert h is not None
        self.done.append(Request(h.method, h.target, h.headers, b"".join(self.parts), h.keep_alive))
        self.head = None


def response_bytes(resp: Response, *, close: bool, server: bytes, body: bool = True) -> bytes:
    """The response as sent: status line, Content-Type, Content-Length, its headers, and
    its body unless `body` is False (the answer to HEAD: the head alone)."""
    fields = [
        (b"Server", server),
        (b"Content-Type", resp.content_type),
        (b"Content-Length", b"%d" % len(resp.body)),
        *resp.headers,
    ]
    head = response_head(resp.status, fields, close=close)
    return head + resp.body if body else head


class HTTPServer:
    """Serve `handler` on `host:port` (0: one the system gives; `port` tells it after
    `start`). `name` signs the error bodies and the Server header."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "podkit",
        max_body: int = MAX_BODY,
        idle_timeout: float = 30.0,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.name = name
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests = _Reader(self.max_body)
        parser = RequestParser(requests)
        server = self.name.encode()
        error: HTTPError | None = None
        try:
            while True:
                while not requests.done and error is None:
                    data = await wait_for(reader.read(65536), self.idle_timeout)
                    if not data:
                        return
                    try:
                        if parser.feed(data) is not None:
                            raise HTTPError(400, "Upgrade is not supported here")
                    except HTTPError as exc:
                        error = exc  # answered after the requests before it
                    if requests.expects and error is None:
                        requests.expects = False
                        writer.write(CONTINUE)
                if not requests.done:
                    assert error is not None
                    body = f"{self.name}: {error.detail}\n".encode()
                    err = Response(error.status, body, b"text/plain; charset=utf-8")
                    writer.write(response_bytes(err, close=True, server=server))
                    await writer.drain()
                    return
                req = requests.done.popleft()
                try:
                    resp = await self.handler(req)
                except Exception as exc:  # a bug in a handler must not end the server
                    print(f"{self.name}: {req.path}: {exc!r}", file=sys.stderr, flush=True)
                    resp = Response(500, f"{self.name}: internal error\n".encode(), b"text/plain")
                head_only = req.method == b"HEAD"
                close = not req.keep_alive
                writer.write(response_bytes(resp, close=close, server=server, body=not head_only))
                await writer.drain()
                if not req.keep_alive:
                    return
        except (OSError, TimeoutError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
