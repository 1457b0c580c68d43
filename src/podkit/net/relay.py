"""A TCP relay that fails over before the first answer: the base of `podkit up`'s service
forwarder and of the broker ambassador.

Each accepted connection goes to the first endpoint of `candidates()` that accepts it.
Until that endpoint sends back a byte, what the client sent (up to `REPLAY_LIMIT`) is
kept; if the endpoint refuses, resets, or closes before answering while the client still
talks (a replica that just died), the bytes are replayed to the next candidate, so the
client sees no error while any endpoint is alive. Once an answer came, the connection is
that endpoint's, and its close is the client's. Back-pressure runs both ways (a side that
cannot keep up pauses reading on the other).

Subclasses say where connections go: `candidates(tried)`, and may count outcomes with
`succeeded`, `failed` (an endpoint refused or dropped a request unanswered) and
`gave_up` (no endpoint took the connection; it is closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast

from podkit.aio import wait_for

Endpoint = tuple[str, int]
REPLAY_LIMIT = 64 * 1024


class _Conn:
    """One client connection, its upstream, and what to replay on a failover."""

    __slots__ = ("answered", "client", "client_eof", "endpoint", "pending", "relay", "tried",
                 "upstream")  # fmt: skip

    def __init__(self, relay: Relay, client: asyncio.Transport) -> None:
        self.relay = relay
        self.client: asyncio.Transport | None = client
        self.upstream: asyncio.Transport | None = None
        self.endpoint: Endpoint | None = None
        self.pending = bytearray()  # sent by the client, kept until the upstream answers
        self.answered = False
        self.client_eof = False
        self.tried: set[Endpoint] = set()

    def from_client(self, data: bytes) -> None:
        if not self.answered:
            if len(self.pending) + len(data) > REPLAY_LIMIT:
                self.answered = True  # too much to replay: stay with this upstream
                if self.upstream is None:
                    self.pending += data  # sent once it connects
                    return
                self.pending = bytearray()
            else:
                self.pending += data
        if self.upstream is not None:
            self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.pending = bytearray()
        if self.client is not None:
            self.client.write(data)

    def upstream_lost(self, upstream: asyncio.Transport, exc: Exception | None) -> None:
        if upstream is not self.upstream:
            return
        self.upstream = None
        client = self.client
        if client is None or client.is_closing():
            return
        if not self.answered and (exc is not None or not self.client_eof):
            if self.endpoint is not None and (exc is not None or self.pending):
                self.relay.failed(self.endpoint)  # dropped a request unanswered
            self.relay.spawn(self.connect())
        else:
            client.close()

    async def connect(self) -> None:
        relay = self.relay
        loop = asyncio.get_running_loop()
        for endpoint in await relay.candidates(self.tried):
            client = self.client
            if client is None or client.is_closing():
                return
            self.tried.add(endpoint)
            try:
                transport, _ = await wait_for(
                    loop.create_connection(lambda: _Upstream(self), *endpoint),
                    relay.connect_timeout,
                )
            except (OSError, TimeoutError):
                relay.failed(endpoint)
                continue
            if client.is_closing():
                transport.close()
                return
            relay.succeeded(endpoint)
            self.endpoint = endpoint
            self.upstream = transport
            if self.pending:
                transport.write(bytes(self.pending))
            if self.client_eof and transport.can_write_eof():
                transport.write_eof()
            client.resume_reading()
            return
        relay.gave_up(len(self.tried))
        client = self.client
        if client is None or client.is_closing():
            return
        # read what the client sent (the refusal may depend on it, and bytes left unread
        # would reset the connection at close and could destroy the answer)
        client.resume_reading()
        for _ in range(50):  # up to half a second for its first line
            if b"\n" in self.pending or client.is_closing():
                break
            await asyncio.sleep(0.01)
        last_word = relay.refusal(bytes(self.pending), len(self.tried))
        self.answered = True  # what it still sends is dropped
        self.pending = bytearray()
        if last_word and not client.is_closing() and client.can_write_eof():
            client.write(last_word)
            client.write_eof()
            loop.call_later(1.0, client.close)  # once it has read the answer
        else:
            client.close()


class _Client(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.conn: _Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        client.pause_reading()
        self.conn = _Conn(self.relay, client)
        self.relay.accepted += 1
        self.relay.conns.add(self.conn)
        self.relay.spawn(self.conn.connect())

    def data_received(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.from_client(data)

    def eof_received(self) -> bool:
        assert self.conn is not None
        self.conn.client_eof = True
        up = self.conn.upstream
        if up is not None and up.can_write_eof():
            up.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.relay.conns.discard(self.conn)
            self.conn.client = None
            if self.conn.upstream is not None:
                self.conn.upstream.close()

    def pause_writing(self) -> None:
        if self.conn is not None and self.conn.upstream is not None:
            self.conn.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.conn is not None and self.conn.upstream is not None:
            self.conn.upstream.resume_reading()


class _Upstream(asyncio.Protocol):
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.from_upstream(data)

    def eof_received(self) -> bool:
        client = self.conn.client
        if self.conn.answered and client is not None and client.can_write_eof():
            client.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.conn.upstream_lost(self.transport, exc)

    def pause_writing(self) -> None:
        if self.conn.client is not None:
            self.conn.client.pause_reading()

    def resume_writing(self) -> None:
        if self.conn.client is not None:
            self.conn.client.resume_reading()


class Relay:
    """Listens on `host:port` and relays each connection to a candidate endpoint."""

    def __init__(self, host: str, port: int, *, connect_timeout: float) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.accepted = 0
        self.connections = 0  # connections that reached an endpoint
        self.conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def candidates(self, tried: set[Endpoint]) -> list[Endpoint]:
        """Endpoints to try for a connection, in order, leaving out those in `tried`."""
        raise NotImplementedError

    def succeeded(self, endpoint: Endpoint) -> None:
        self.connections += 1

    def failed(self, endpoint: Endpoint) -> None:
        """`endpoint` refused a connection or dropped one before answering."""

    def gave_up(self, tried: int) -> None:
        """No endpoint took a connection (`tried` were tried); it is being closed."""

    def refusal(self, sent: bytes, tried: int) -> bytes:
        """What to write to a client no endpoint took, before closing, given what it
        `sent` so far (nothing by default: the relay does not know the protocol)."""
        return b""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def listen(self) -> None:
        """Start accepting; `port` 0 becomes the port the system chose."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Client(self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop_accepting(self) -> None:
        """Close the listening socket; relayed connections go on."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def close_connections(self) -> None:
        """Stop accepting and close every relayed connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            for transport in (conn.client, conn.upstream):
                if transport is not None:
                    transport.close()
