"""Server-side TLS on the event loop, between the socket and an app protocol.

`TLSConnection(context, app)` is the protocol given to `loop.create_server` for a TLS
port. It runs the handshake over memory BIOs, then calls `app.connection_made(self)`:
to the app it is the transport. Each read from the socket is decrypted whole into one
`data_received`; each `write` is encrypted and handed to the socket's transport at once,
whose buffer is the only one (its flow control reaches the app unchanged). It does what
podkit's servers need and no more, so a request costs fewer steps than through the
event loop's general TLS layer:

- a handshake that fails is closed after its alert (a plain HTTP request gets a plain
  400 saying the port speaks HTTPS); one not done within `handshake_timeout` seconds is
  aborted (the app sees neither);
- the peer's close_notify or a TCP FIN is `eof_received` (what follows is dropped); an
  unreadable record aborts;
- `close()` sends close_notify then closes; `write_eof()` sends close_notify and a FIN,
  and what the peer still sends reaches the app (the other way of a tunnel; a lingering
  close drops it);
- `get_extra_info` answers `ssl_object`, `sslcontext`, `peercert` and `cipher`, and
  otherwise asks the socket's transport.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, cast

from podkit.net.httpwrite import response_head

READ_MAX = 256 * 1024  # bytes decrypted per read call
_PLAIN_HTTP = b"This port speaks HTTPS: a plain HTTP request was sent to it.\n"
PLAIN_HTTP_ANSWER = (
    response_head(
        400,
        [
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"close"),
            (b"Content-Length", b"%d" % len(_PLAIN_HTTP)),
        ],
    )
    + _PLAIN_HTTP
)

HANDSHAKE = 0
OPEN = 1
EOF_SENT = 2  # close_notify and FIN sent: the peer's side is still read
CLOSED = 3


def _discard(data: bytes) -> None:
    pass


class TLSConnection(asyncio.Protocol):
    """A TLS server connection: the socket's protocol and the app's transport."""

    def __init__(
        self, context: ssl.SSLContext, app: asyncio.Protocol, handshake_timeout: float = 10.0
    ) -> None:
        self.app = app
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        # the calls made per record, bound once (no method lookup per call)
        self.feed: Callable[[bytes], int] = self.incoming.write
        self.drain: Callable[[], bytes] = self.outgoing.read
        self.decrypt: Callable[[int], bytes] = sslobj.read
        self.encrypt: Callable[[bytes | bytearray | memoryview], int] = sslobj.write
        self.send: Callable[[bytes], None] = _discard
        self.raw: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.closing = False
        self.peer_eof = False
        self.keep_open = False  # what the app's eof_received answered
        self.handshake_timeout = handshake_timeout
        self.timer: asyncio.TimerHandle | None = None

    # --- the socket's side ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        self.send = self.raw.write
        self.timer = asyncio.get_running_loop().call_later(
            self.handshake_timeout, self._handshake_expired
        )

    def data_received(self, data: bytes) -> None:
        if self.peer_eof:
            return  # nothing is read after close_notify: fed, it would pile up unread
        self.feed(data)
        if self.state == HANDSHAKE:
            self._handshake()
        else:
            self._read()  # open, or our FIN sent (the peer's side of a tunnel)

    def eof_received(self) -> bool | None:
        state = self.state
        if state in (OPEN, EOF_SENT) and not self.peer_eof:
            self.peer_eof = True  # close_notify or FIN, whichever came first
            self.keep_open = bool(self.app.eof_received())
        if self.keep_open and not self.closing:
            return True
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        was = self.state
        self.state = CLOSED
        self.closing = True
        self.raw = None
        self.send = _discard
        if was != HANDSHAKE:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.state != HANDSHAKE:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.state != HANDSHAKE:
            self.app.resume_writing()

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            if getattr(exc, "reason", None) == "HTTP_REQUEST":
                self.send(PLAIN_HTTP_ANSWER)  # what a browser or curl can show
            self._flush()  # the alert, which closing sends before the FIN
            self.close()
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = OPEN
        self._flush()
        self.app.connection_made(cast(asyncio.Transport, self))
        if self.state == OPEN and (self.incoming.pending or self.sslobj.pending()):
            self._read()  # a request in the same read as the handshake's end

    def _handshake_expired(self) -> None:
        self.timer = None
        if self.state == HANDSHAKE:
            self.abort()

    def _read(self) -> None:
        sslobj = self.sslobj
        incoming = self.incoming
        decrypt = self.decrypt
        first = b""
        chunks: list[bytes] | None = None
        closed = False
        try:
            first = decrypt(READ_MAX)  # bytes were just fed
            if not first:
                closed = True  # close_notify
            while not closed and (incoming.pending or sslobj.pending()):
                chunk = decrypt(READ_MAX)
                if not chunk:
                    closed = True
                elif chunks is None:
                    chunks = [first, chunk]
                else:
                    chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            closed = True
        except (ssl.SSLError, OSError):
            self.abort()
            return
        if self.outgoing.pending:
            self._flush()  # a post-handshake message's answer (TLS 1.3 key update)
        if first:
            self.app.data_received(first if chunks is None else b"".join(chunks))
        if closed and self.state in (OPEN, EOF_SENT):
            self.eof_received()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.send(self.drain())

    # --- the app's side: the transport ---
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.state != OPEN or self.closing:
            return
        self.encrypt(data)
        self.send(self.drain())

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.state != OPEN or self.closing:
            return
        self._close_notify()
        self.state = EOF_SENT
        raw = self.raw
        if raw is not None and raw.can_write_eof():
            raw.write_eof()
            self.send = _discard  # nothing may follow the FIN

    def close(self) -> None:
        if self.closing:
            return
        if self.state == OPEN:
            self._close_notify()
        self.closing = True
        raw = self.raw
        if raw is not None:
            raw.close()

    def abort(self) -> None:
        self.closing = True
        raw = self.raw
        if raw is not None:
            raw.abort()

    def _close_notify(self) -> None:
        try:
            self.sslobj.unwrap()
        except (ssl.SSLError, OSError):
            pass  # it waits for the peer's close_notify, which nobody needs
        self._flush()

    def is_closing(self) -> bool:
        return self.closing or self.raw is None or self.raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.sslobj.context  # the one the handshake chose (SNI)
        if name == "peercert":
            return self.sslobj.getpeercert()
        if name == "cipher":
            return self.sslobj.cipher()
        raw = self.raw
        return default if raw is None else raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        if self.raw is not None:
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self.raw is not None:
            self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw is not None and self.raw.is_reading()

    def get_write_buffer_size(self) -> int:
        return 0 if self.raw is None else self.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.raw is not None:
            self.raw.set_write_buffer_limits(high, low)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.app

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.app = cast(asyncio.Protocol, protocol)
