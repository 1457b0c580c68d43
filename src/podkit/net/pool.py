"""Pooled keep-alive connections to one upstream address.

`ConnectionPool.take()` hands back an idle connection without awaiting (the fast path of a
proxy: no task, no future), `connect()` opens a new one, `put()` returns a connection after
a complete exchange. Idle connections are reused last-in first-out, so the warm ones stay
warm and the surplus ages out through `close_idle()`. A connection that the upstream closes
while idle leaves the pool by itself (`PooledConnection.connection_lost`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from podkit.aio import wait_for


class PooledConnection(asyncio.Protocol):
    """Base protocol for connections a `ConnectionPool` manages."""

    __slots__ = ("idle_since", "pool", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pool: ConnectionPool[PooledConnection] | None = None
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.pool is not None:
            self.pool.discard(self)

    @property
    def usable(self) -> bool:
        t = self.transport
        return t is not None and not t.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


C = TypeVar("C", bound=PooledConnection)


class ConnectionPool(Generic[C]):
    """Idle keep-alive connections to `host:port`, made by `factory`."""

    def __init__(
        self,
        host: str,
        port: int,
        factory: Callable[[], C],
        *,
        max_idle: int = 128,
        connect_timeout: float = 2.0,
    ) -> None:
        self.host = host
        self.port = port
        self.factory = factory
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.idle: list[C] = []
        self.opened = 0  # connections made, for metrics and tests

    def take(self) -> C | None:
        """An idle connection, or None (then `await connect()`)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            t = conn.transport
            if t is not None and not t.is_closing():
                return conn
        return None

    async def connect(self) -> C:
        """A new connection; OSError or TimeoutError when the upstream cannot be reached."""
        loop = asyncio.get_running_loop()
        _, conn = await wait_for(
            loop.create_connection(self.factory, self.host, self.port), self.connect_timeout
        )
        conn.pool = self  # type: ignore[assignment]
        self.opened += 1
        return conn

    def put(self, conn: C, now: float = 0.0) -> None:
        """Return `conn` after a complete exchange; closed when the pool is full."""
        t = conn.transport
        if t is None or t.is_closing():
            return
        if len(self.idle) >= self.max_idle:
            t.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def discard(self, conn: PooledConnection) -> None:
        try:
            self.idle.remove(conn)  # type: ignore[arg-type]
        except ValueError:
            pass

    def close_idle(self, older_than: float) -> None:
        """Close idle connections unused since `older_than` (a loop time)."""
        keep = [c for c in self.idle if c.idle_since >= older_than]
        for c in self.idle:
            if c.idle_since < older_than:
                c.close()
        self.idle[:] = keep

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for c in idle:
            c.close()
