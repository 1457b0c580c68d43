"""Sans-IO HTTP/1.1 over httptools: bytes in, callbacks (or events) out, errors with a status.

Two parsers, one for each side of a proxy:

- `RequestParser` reads what a client sends (server side): pipelined requests on one
  keep-alive connection, bodies by Content-Length or chunked, handed over piece by piece as
  they arrive (never buffered whole), and an Upgrade (WebSocket) hand-off.
- `ResponseParser` reads what an upstream answers (client side): the same framing, plus
  interim 1xx responses, bodies that run until the connection closes, and responses to HEAD.

Each parser calls a handler (`RequestHandler` / `ResponseHandler`) as the message goes by;
`feed(data)` returns the bytes that follow an accepted Upgrade (the start of the tunnel),
otherwise None. The only exception `feed` raises for bad input is `HTTPError`, which
carries the status to answer (400 malformed, 414 request target too long, 431 headers too
large, 501 unsupported transfer coding) and a sentence naming what was wrong. After an
`HTTPError` the connection must be closed: its byte stream can no longer be trusted.

Smuggling defences: a request carrying both Content-Length and Transfer-Encoding, two
different Content-Lengths, a Transfer-Encoding other than a final `chunked`, obs-folded
headers or bare LF line endings are all refused (llhttp's strict mode, checked again here).

`ServerConnection` wraps `RequestParser` in the h11 style (`receive_data` / `next_event`)
for tests and tools; the proxy uses the callbacks directly, which allocate less. The
writing side (heads, chunks, small answers) is `podkit.net.httpwrite`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httptools

from podkit.net.httpwrite import REASONS

# Limits (bytes) a parser enforces unless given others.
MAX_TARGET = 8 * 1024
MAX_HEAD = 32 * 1024  # request/status line plus all header lines
MAX_HEADERS = 100


class HTTPError(Exception):
    """Bad input: answer `status` with `detail`, then close the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status} {REASONS.get(status, b'').decode()}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(slots=True)
class RequestHead:
    """A request line and its headers, as the client sent them.

    Treat it as read-only: a proxy may share one RequestHead between requests whose heads
    are the same bytes (see `podkit.net.proxy.engine`)."""

    method: bytes
    target: bytes
    version: str  # "1.1" or "1.0"
    headers: list[tuple[bytes, bytes]]  # every header, names as sent
    keep_alive: bool = True
    content_length: int | None = None
    chunked: bool = False
    upgrade: bytes | None = None  # the Upgrade header's value when the request upgrades
    connection: frozenset[bytes] = frozenset()  # lowercased tokens of Connection headers
    # A proxy's rewritten head for this request, up to where X-Forwarded-* go (its cache).
    forward_prefix: bytes | None = None
    # A keep-alive HTTP/1.1 request, not HEAD, not upgrading: an answer to it may pass
    # through a proxy as received (computed).
    plain: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.plain = (
            self.keep_alive
            and self.version == "1.1"
            and self.upgrade is None
            and self.method != b"HEAD"
        )

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        """The first header called `name` (lowercase), or None."""
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass(slots=True)
class ResponseHead:
    """A status line and its headers, as the upstream sent them."""

    status: int
    reason: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool = True
    content_length: int | None = None
    chunked: bool = False
    connection: frozenset[bytes] = frozenset()
    until_close: bool = False  # no length and no chunking: the body ends when the peer closes
    no_body: bool = False  # 1xx, 204, 304, or the answer to HEAD

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class RequestHandler(Protocol):
    def on_request(self, head: RequestHead) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_request_end(self) -> None: ...


class ResponseHandler(Protocol):
    def on_response(self, head: ResponseHead) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_response_end(self) -> None: ...


_NO_TOKENS: frozenset[bytes] = frozenset()
# Fields that frame a message or route it: a Connection token never makes them hop-by-hop
# (`Connection: Content-Length` must not strip the length of a body that is still sent).
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host", b"upgrade"})


def connection_tokens(tokens: list[bytes] | None) -> frozenset[bytes]:
    """The Connection header's tokens, without the framing fields (see FRAMING)."""
    if tokens is None:
        return _NO_TOKENS
    return frozenset(tokens) - FRAMING


def _split_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class _Headers:
    """Header bookkeeping shared by both parsers (sizes, framing headers)."""

    __slots__ = (
        "_connection",
        "_content_length",
        "_error",
        "_head_size",
        "_headers",
        "_hosts",
        "_max_head",
        "_max_headers",
        "_pending",
        "_te",
        "in_head",
        "trailers",
    )

    def __init__(self, max_head: int, max_headers: int) -> None:
        self._max_head = max_head
        self._max_headers = max_headers
        self._error: HTTPError | None = None
        self.in_head = False  # a head has started and is not complete (read-only)
        # the trailer fields of the current chunked message, once read (read-only)
        self.trailers: Sequence[tuple[bytes, bytes]] = ()
        self._pending = 0  # bytes fed while a head was incomplete (slow or huge heads)
        self._reset()

    def _reset(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self.trailers = ()
        self._head_size = 0
        self._content_length: int | None = None
        self._te: list[bytes] | None = None
        self._connection: list[bytes] | None = None
        self._hosts = 0  # Host fields seen

    def _fail(self, status: int, detail: str) -> None:
        self._error = HTTPError(status, detail)
        raise self._error

    def _trailer(self, name: bytes, value: bytes) -> None:
        """Keep a trailer field apart from the head (it must never act as a header), under
        the same limits as the head's fields."""
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._max_head:
            self._fail(431, f"head and trailer fields larger than {self._max_head} bytes")
        trailers = self.trailers
        if not isinstance(trailers, list):
            trailers = self.trailers = []
        if len(self._headers) + len(trailers) >= self._max_headers:
            self._fail(431, f"more than {self._max_headers} header and trailer fields")
        trailers.append((name, value))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:  # after the head: a trailer field of a chunked body
            self._trailer(name, value)
            return
        self._head_size += len(name) + len(value) + 4
        headers = self._headers
        if self._head_size > self._max_head:
            self._fail(431, f"request headers larger than {self._max_head} bytes")
        if len(headers) >= self._max_headers:
            self._fail(431, f"more than {self._max_headers} header fields")
        headers.append((name, value))
        n = len(name)
        if n == 4:
            if name == b"Host" or (name[0] | 0x20 == 0x68 and name.lower() == b"host"):
                self._hosts += 1  # no lower() for Date, ETag, Vary
        elif n == 14 or n == 17 or n == 10:  # content-length, transfer-encoding, connection
            lname = name.lower()
            if lname == b"content-length":
                value = value.strip()
                if not value.isdigit() or len(value) > 18:
                    self._fail(400, f"invalid Content-Length {value[:40]!r}")
                length = int(value)
                if self._content_length is not None and self._content_length != length:
                    self._fail(400, "two different Content-Length headers")
                self._content_length = length
            elif lname == b"transfer-encoding":
                if self._te is None:
                    self._te = []
                self._te.extend(_split_tokens(value))
            elif lname == b"connection":
                if self._connection is None:
                    self._connection = []
                self._connection.extend(_split_tokens(value))

    def _framing(self) -> bool:
        """Check Content-Length against Transfer-Encoding; return whether the body is chunked."""
        te = self._te
        if te is None:
            return False
        if self._content_length is not None:
            self._fail(400, "both Content-Length and Transfer-Encoding (request smuggling)")
        if not te or te[-1] != b"chunked":
            self._fail(501, f"unsupported Transfer-Encoding {b', '.join(te)!r}")
        if len(te) > 1:
            self._fail(501, f"unsupported Transfer-Encoding {b', '.join(te)!r}")
        return True

    def _translate(self, exc: httptools.HttpParserError) -> HTTPError:
        """The HTTPError for a parser error (ours, raised in a callback, or llhttp's)."""
        if self._error is not None:
            return self._error
        ctx = exc.__context__
        if isinstance(ctx, HTTPError):  # a handler refused the message (a body too large)
            self._error = ctx
            return ctx
        if ctx is not None:
            raise ctx  # a bug in a handler: surface it, do not disguise it as bad input
        reason = str(exc.args[0]) if exc.args else type(exc).__name__
        if "PRI" in reason:  # llhttp stops at the HTTP/2 preface
            self._error = HTTPError(505, "HTTP/2 is not supported: HTTP/1.1 and 1.0 are")
            return self._error
        if "Content-Length" in reason and "Transfer-Encoding" in reason:
            reason += " (request smuggling)"
        self._error = HTTPError(400, f"malformed HTTP: {reason}")
        return self._error


class RequestParser(_Headers):
    """Parse requests from a client and call `handler` as they go by."""

    __slots__ = ("_body_framing", "_handler", "_parser", "_target", "_upgraded", "max_target")

    def __init__(
        self,
        handler: RequestHandler,
        *,
        max_target: int = MAX_TARGET,
        max_head: int = MAX_HEAD,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        super().__init__(max_head, max_headers)
        self._handler = handler
        self.max_target = max_target
        self._target = b""
        self._upgraded = False
        self._body_framing: bytes | None = None  # see _read_body
        self._parser = httptools.HttpRequestParser(self)

    def feed(self, data: bytes) -> bytes | None:
        """Parse `data`; return the tunnel's first bytes after an Upgrade, else None."""
        if self._error is not None:
            raise self._error
        if self._upgraded:
            raise RuntimeError("the connection was upgraded: its bytes are no longer HTTP")
        was_in_head = self.in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            at = exc.args[0]
            if self._body_framing is None:
                self._upgraded = True
                return data[at:]
        except httptools.HttpParserError as exc:
            raise self._translate(exc) from None
        else:
            at = -1
        if at >= 0:  # outside the handler: an error there must not chain to the Upgrade
            return self._read_body(data[at:])
        if was_in_head and self.in_head:
            self._pending += len(data)
            if self._pending > self._max_head:
                self._fail(431, f"request head larger than {self._max_head} bytes")
        return None

    def _read_body(self, rest: bytes) -> bytes | None:
        """Go on after a request that asked to upgrade but has a body (its upgrade was
        dropped in `on_headers_complete`). llhttp skips the body of any request asking to
        upgrade, so a new parser takes over, primed with a head that frames the body the
        same way; the head's callbacks are not passed on."""
        framing = self._body_framing
        assert framing is not None
        self._body_framing = None
        primer = _Primer(self)
        self._parser = httptools.HttpRequestParser(primer)
        self._parser.feed_data(b"POST / HTTP/1.1\r\nHost: -\r\n%b\r\n" % framing)
        primer.priming = False
        return self.feed(rest) if rest else None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.in_head = True
        self._pending = 0
        self._target = b""
        self._reset()

    def on_url(self, url: bytes) -> None:
        target = self._target + url if self._target else url
        if len(target) > self.max_target:
            self._fail(414, f"request target longer than {self.max_target} bytes")
        self._target = target

    def on_headers_complete(self) -> None:
        self.in_head = False
        p = self._parser
        method: bytes = p.get_method()
        version: str = p.get_http_version()
        if version != "1.1" and version != "1.0":
            self._fail(505, f"HTTP/{version} is not supported: HTTP/1.1 and 1.0 are")
        if self._hosts != 1 and (self._hosts or version == "1.1"):
            self._fail(400, "no Host header" if not self._hosts else "more than one Host header")
        chunked = False if self._te is None else self._framing()
        upgrade: bytes | None = None
        if p.should_upgrade():
            if method == b"CONNECT":
                self._fail(405, "CONNECT is not supported: this is a reverse proxy")
            # A body ahead of the new protocol: the upgrade is dropped (RFC 9110 7.8 lets a
            # server ignore it) and the body read as a body, never as tunnel bytes (the
            # head forwarded says how long it is).
            length = self._content_length
            if chunked:
                self._body_framing = b"Transfer-Encoding: chunked\r\n"
            elif length:
                self._body_framing = b"Content-Length: %d\r\n" % length
            else:
                upgrade = self._find(b"upgrade") or b""
        self._handler.on_request(
            RequestHead(
                method,
                self._target,
                version,
                self._headers,
                p.should_keep_alive(),
                self._content_length,
                chunked,
                upgrade,
                connection_tokens(self._connection),
            )
        )

    def _find(self, lname: bytes) -> bytes | None:
        for k, v in self._headers:
            if k.lower() == lname:
                return v
        return None

    def on_body(self, body: bytes) -> None:
        self._handler.on_body(body)

    def on_message_complete(self) -> None:
        if self._body_framing is None:  # else llhttp skipped a body that is coming
            self._handler.on_request_end()


class _Primer:
    """Callbacks for a RequestParser's new llhttp parser (see `RequestParser._read_body`):
    silent while its priming head is fed, then the owner's own."""

    __slots__ = ("owner", "priming")

    def __init__(self, owner: RequestParser) -> None:
        self.owner = owner
        self.priming = True

    def on_message_begin(self) -> None:
        if not self.priming:
            self.owner.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.priming:
            self.owner.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.priming:
            self.owner.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.priming:
            self.owner.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.owner.on_body(body)

    def on_message_complete(self) -> None:
        self.owner.on_message_complete()


class ResponseParser(_Headers):
    """Parse responses from an upstream and call `handler` as they go by.

    Call `expect(method)` before each response with the method of the request it answers:
    one final response is parsed per `expect`. Bytes after a complete final response
    (a second answer nobody asked for, or anything else but empty lines) are not parsed:
    `surplus` becomes True and the parser stops for good, so its connection must not be
    reused. A response to HEAD ends at its head and stops the parser too (llhttp cannot
    be told to skip the body a HEAD response announces).
    """

    __slots__ = (
        "_answered",
        "_handler",
        "_head_request",
        "_parser",
        "_reason",
        "_upgraded",
        "surplus",
    )

    def __init__(
        self, handler: ResponseHandler, *, max_head: int = 64 * 1024, max_headers: int = 200
    ) -> None:
        super().__init__(max_head, max_headers)
        self._handler = handler
        self._head_request = False
        self._answered = False  # the final response to the last `expect` is complete
        self.surplus = False  # bytes came after a complete answer (read-only)
        self._reason = b""
        self._upgraded = False
        self._parser = httptools.HttpResponseParser(self)

    def expect(self, method: bytes) -> None:
        self._head_request = method == b"HEAD"
        self._answered = False

    def feed(self, data: bytes) -> bytes | None:
        """Parse `data`; return the tunnel's first bytes after a 101, else None."""
        if self._error is not None:
            raise self._error
        if self._upgraded:
            if not self.surplus and self._answered:  # after a HEAD answer: nothing more
                self.surplus = bool(data)
            return None  # after a HEAD answer, a 101 or surplus nothing more is parsed here
        was_in_head = self.in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded = True
            return data[exc.args[0] :]
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Stop):
                return None  # the answer is complete; what follows it is not parsed
            if self._answered:  # not HTTP after a complete answer: surplus, not an error
                self.surplus = True
                self._upgraded = True
                self._error = None
                return None
            raise self._translate(exc) from None
        if was_in_head and self.in_head:
            self._pending += len(data)
            if self._pending > self._max_head:
                self._fail(502, f"response head larger than {self._max_head} bytes")
        return None

    def on_message_begin(self) -> None:
        if self._answered:  # a second answer to one request
            self.surplus = True
            self._upgraded = True
            raise _Stop
        self.in_head = True
        self._pending = 0
        self._reason = b""
        self._reset()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_headers_complete(self) -> None:
        self.in_head = False
        p = self._parser
        status: int = p.get_status_code()
        chunked = self._framing()
        no_body = status < 200 or status == 204 or status == 304 or self._head_request
        head = ResponseHead(
            status,
            self._reason,
            p.get_http_version(),
            self._headers,
            p.should_keep_alive(),
            self._content_length,
            chunked,
            connection_tokens(self._connection),
            not no_body and not chunked and self._content_length is None,
            no_body,
        )
        if self._head_request and status >= 200:
            # The body announced is not coming; this connection's parser is now out of step.
            head.keep_alive = False
            self._handler.on_response(head)
            self._handler.on_response_end()
            self._head_request = False
            self._answered = True
            self._upgraded = True  # nothing more is parsed on this connection
            raise _Stop
        self._handler.on_response(head)

    def on_body(self, body: bytes) -> None:
        self._handler.on_body(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() >= 200 or self._parser.should_upgrade():
            self._answered = True
            self._handler.on_response_end()

    def _translate(self, exc: httptools.HttpParserError) -> HTTPError:
        err = super()._translate(exc)
        if err.status == 400:  # an upstream speaking bad HTTP is a bad gateway
            err = self._error = HTTPError(502, f"upstream sent {err.detail}")
        return err


class _Stop(Exception):
    """Raised inside a callback to stop llhttp (after a HEAD response, or at surplus)."""


# --- h11-style events over RequestParser, for tests and simple servers ----------------


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    pass


@dataclass(slots=True)
class Tunnel:
    """The request upgraded; `data` is what followed its head."""

    data: bytes


Event = RequestHead | ResponseHead | Data | EndOfMessage | Tunnel


@dataclass
class _Collector:
    events: deque[Event] = field(default_factory=deque)

    def on_request(self, head: RequestHead) -> None:
        self.events.append(head)

    def on_response(self, head: ResponseHead) -> None:
        self.events.append(head)

    def on_body(self, data: bytes) -> None:
        self.events.append(Data(data))

    def on_request_end(self) -> None:
        self.events.append(EndOfMessage())

    def on_response_end(self) -> None:
        self.events.append(EndOfMessage())


class ServerConnection:
    """The server side of one connection: `receive_data(bytes)`, then `next_event()`.

    Events: `RequestHead`, `Data` (body pieces), `EndOfMessage`, `Tunnel` (after an
    Upgrade, every later byte comes as a `Tunnel` event); None when more bytes are needed.
    `receive_data` raises `HTTPError` on bad input.
    """

    def __init__(self, **limits: int) -> None:
        self._collector = _Collector()
        self._parser = RequestParser(self._collector, **limits)
        self._tunnel = False

    def receive_data(self, data: bytes) -> None:
        if self._tunnel:  # after an upgrade every byte belongs to the tunnel
            self._collector.events.append(Tunnel(data))
            return
        tunnel = self._parser.feed(data)
        if tunnel is not None:
            self._tunnel = True
            self._collector.events.append(Tunnel(tunnel))

    def next_event(self) -> Event | None:
        events = self._collector.events
        return events.popleft() if events else None


class ClientConnection:
    """The client side of one connection: `expect(method)`, `receive_data`, `next_event`."""

    def __init__(self) -> None:
        self._collector = _Collector()
        self._parser = ResponseParser(self._collector)
        self._tunnel = False

    def expect(self, method: bytes) -> None:
        self._parser.expect(method)

    def receive_data(self, data: bytes) -> None:
        if self._tunnel:  # after an upgrade every byte belongs to the tunnel
            self._collector.events.append(Tunnel(data))
            return
        tunnel = self._parser.feed(data)
        if tunnel is not None:
            self._tunnel = True
            self._collector.events.append(Tunnel(tunnel))

    def next_event(self) -> Event | None:
        events = self._collector.events
        return events.popleft() if events else None
