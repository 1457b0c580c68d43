"""The simple service of `podkit up`: a round-robin TCP forwarder over ready endpoints.

It is the placeholder for the `lb` component: anything with `start`, `set_endpoints`
and `close` can take its place.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable
from typing import Protocol

Endpoint = tuple[str, int]


class ServiceProxy(Protocol):
    """What the runtime needs from a service's data plane."""

    async def start(self) -> None: ...

    def set_endpoints(self, endpoints: list[Endpoint]) -> None: ...

    async def close(self) -> None: ...


class _Pipe(asyncio.Protocol):
    """One direction-pair of a proxied connection; pauses its peer on back-pressure."""

    def __init__(self, on_made: Callable[[_Pipe], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self._pending: list[bytes] = []
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self._pending.append(data)
            return
        peer.transport.write(data)

    def flush_to(self, peer: _Pipe) -> None:
        self.peer = peer
        assert peer.transport is not None
        for chunk in self._pending:
            peer.transport.write(chunk)
        self._pending.clear()

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            if self.peer.transport.can_write_eof():
                self.peer.transport.write_eof()
                return True
            self.peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def _same(pipe: _Pipe) -> _Pipe:
    return pipe


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
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

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

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, self.host, self.port, reuse_address=True
        )

    def _accept(self) -> _Pipe:
        return _Pipe(on_made=self._on_client)

    def _on_client(self, client: _Pipe) -> None:
        assert client.transport is not None
        client.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: _Pipe) -> None:
        assert client.transport is not None
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self._have_endpoints.wait(), self.wait_for_endpoint)
        except TimeoutError:
            client.transport.close()
            return
        tried = 0
        while tried < len(self._endpoints):
            host, port = next(self._cycle)
            tried += 1
            upstream = _Pipe()
            try:
                await asyncio.wait_for(
                    loop.create_connection(functools.partial(_same, upstream), host, port),
                    self.connect_timeout,
                )
            except (OSError, TimeoutError):
                continue  # nothing was sent yet: the next endpoint is safe to try
            if client.transport.is_closing():
                assert upstream.transport is not None
                upstream.transport.close()
                return
            upstream.peer = client
            client.flush_to(upstream)
            client.transport.resume_reading()
            self.connections += 1
            return
        client.transport.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
