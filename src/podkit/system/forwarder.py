"""The simple service of `podkit up`: a round-robin TCP forwarder over ready endpoints.

A connection goes to the next ready endpoint. If that endpoint refuses, resets or closes
before sending back a single byte (a replica that just died), the bytes the client sent so
far (up to 64 KiB) are replayed to the next endpoint, so a killed replica costs no failed
request. It is the placeholder for the `lb` component: anything with `start`,
`set_endpoints` and `close` can take its place.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from typing import Any, Protocol

Endpoint = tuple[str, int]
REPLAY_LIMIT = 64 * 1024


class ServiceProxy(Protocol):
    """What the runtime needs from a service's data plane."""

    async def start(self) -> None: ...

    def set_endpoints(self, endpoints: list[Endpoint]) -> None: ...

    async def close(self) -> None: ...


class _Conn:
    """One client connection and its current upstream."""

    __slots__ = ("answered", "client", "client_eof", "fwd", "pending", "tried", "upstream")

    def __init__(self, fwd: TCPForwarder) -> None:
        self.fwd = fwd
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending = bytearray()  # sent by the client, kept until the upstream answers
        self.answered = False
        self.client_eof = False
        self.tried: set[Endpoint] = set()

    def from_client(self, data: bytes) -> None:
        if not self.answered:
            if len(self.pending) + len(data) > REPLAY_LIMIT:
                self.answered = True  # too large to replay: commit to this upstream
            else:
                self.pending += data
        if self.upstream is not None:
            self.upstream.write(data)
        elif self.answered:  # over the limit before any upstream: keep it anyway
            self.pending += data

    def from_upstream(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
        self.pending.clear()
        if self.client is not None:
            self.client.write(data)

    def upstream_gone(self, upstream: asyncio.Transport) -> None:
        if upstream is not self.upstream:
            return
        self.upstream = None
        if not self.answered and self.client is not None and not self.client.is_closing():
            self.fwd._spawn(self.connect())  # died before answering: try the next one
        elif self.client is not None:
            self.client.close()

    async def connect(self) -> None:
        fwd = self.fwd
        loop = asyncio.get_running_loop()
        client = self.client
        assert client is not None
        try:
            await asyncio.wait_for(fwd._have_endpoints.wait(), fwd.wait_for_endpoint)
        except TimeoutError:
            client.close()
            return
        for _ in range(len(fwd._endpoints)):
            endpoint = next(fwd._cycle)
            if endpoint in self.tried:
                continue
            self.tried.add(endpoint)
            try:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _Upstream(self), *endpoint),
                    fwd.connect_timeout,
                )
            except (OSError, TimeoutError):
                continue
            if client.is_closing():
                transport.close()
                return
            self.upstream = transport
            if self.pending:
                transport.write(bytes(self.pending))
            if self.client_eof and transport.can_write_eof():
                transport.write_eof()
            client.resume_reading()
            fwd.connections += 1
            return
        client.close()


class _Client(asyncio.Protocol):
    def __init__(self, fwd: TCPForwarder) -> None:
        self.conn = _Conn(fwd)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        conn = self.conn
        conn.client = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]
        conn.fwd._spawn(conn.connect())

    def data_received(self, data: bytes) -> None:
        self.conn.from_client(data)

    def eof_received(self) -> bool:
        self.conn.client_eof = True
        up = self.conn.upstream
        if up is not None and up.can_write_eof():
            up.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn.upstream is not None:
            self.conn.upstream.close()
        self.conn.client = None


class _Upstream(asyncio.Protocol):
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

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
            self.conn.upstream_gone(self.transport)

    def pause_writing(self) -> None:
        if self.conn.client is not None:
            self.conn.client.pause_reading()

    def resume_writing(self) -> None:
        if self.conn.client is not None:
            self.conn.client.resume_reading()


class TCPForwarder:
    """Listens on `host:port` and forwards each connection to the next ready endpoint."""

    def __init__(
        self, host: str, port: int, *, connect_timeout: float = 2.0, wait_for_endpoint: float = 3.0
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.wait_for_endpoint = wait_for_endpoint
        self._endpoints: list[Endpoint] = []
        self._cycle = itertools.cycle(self._endpoints)
        self._have_endpoints = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        if endpoints == self._endpoints:
            return
        self._endpoints = list(endpoints)
        self._cycle = itertools.cycle(self._endpoints)
        if self._endpoints:
            self._have_endpoints.set()
        else:
            self._have_endpoints.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Client(self), self.host, self.port, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
