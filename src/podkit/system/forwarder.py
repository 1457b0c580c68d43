"""The simple service of `podkit up`: a round-robin TCP forwarder over ready endpoints.

A connection goes to the next ready endpoint. If that endpoint refuses, resets or closes
before sending back a single byte (a replica that just died), the bytes the client sent so
far (up to 64 KiB) are replayed to the next endpoint, so a killed replica costs no failed
request (`podkit.net.relay`). When no replica is ready (for `wait_for_endpoint` seconds),
a client that sent an HTTP request line gets a 503 saying so; any other is closed.
A service with `lb:` runs `podkit lb` instead: anything
with `start`, `set_endpoints`, `routing` and `close` can take this one's place.
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol

from podkit.aio import wait_for
from podkit.net.httpwrite import simple_response
from podkit.net.relay import Endpoint, Relay

__all__ = ["Endpoint", "ServiceProxy", "TCPForwarder"]

HTTP_REQUEST = re.compile(rb"[A-Z]+ \S+ HTTP/1\.[01]\r?\n")  # a request line, whole


class ServiceProxy(Protocol):
    """What the runtime needs from a service's data plane."""

    async def start(self) -> None: ...

    def set_endpoints(self, endpoints: list[Endpoint]) -> None: ...

    @property
    def routing(self) -> bool:
        """Whether a new connection now reaches a ready replica."""
        ...

    async def close(self) -> None: ...


class TCPForwarder(Relay):
    """Listens on `host:port` and forwards each connection to the next ready endpoint."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 2.0,
        wait_for_endpoint: float = 3.0,
        name: str = "",
    ) -> None:
        super().__init__(host, port, connect_timeout=connect_timeout)
        self.wait_for_endpoint = wait_for_endpoint
        self.name = name
        self._endpoints: list[Endpoint] = []
        self._next = 0
        self._have_endpoints = asyncio.Event()

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints)

    @property
    def routing(self) -> bool:
        return bool(self._endpoints)

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        if endpoints == self._endpoints:
            return
        self._endpoints = list(endpoints)
        self._next = 0
        if self._endpoints:
            self._have_endpoints.set()
        else:
            self._have_endpoints.clear()

    async def candidates(self, tried: set[Endpoint]) -> list[Endpoint]:
        """The ready endpoints from the next in turn (waits a moment while there are none)."""
        if not self._endpoints:
            try:
                await wait_for(self._have_endpoints.wait(), self.wait_for_endpoint)
            except TimeoutError:
                return []
        eps = self._endpoints
        start = self._next % len(eps)
        self._next = start + 1
        return [e for e in eps[start:] + eps[:start] if e not in tried]

    def refusal(self, sent: bytes, tried: int) -> bytes:
        """A client that began an HTTP request gets a 503 saying why; any other is
        closed without a word (the forwarder does not know its protocol)."""
        if HTTP_REQUEST.match(sent) is None:
            return b""
        what = f"service '{self.name}'" if self.name else "this service"
        why = f"no replica of {what} is ready" if not tried else (
            f"no ready replica of {what} took the connection ({tried} tried)")  # fmt: skip
        return simple_response(503, f"{why}\n".encode(), close=True)

    async def start(self) -> None:
        await self.listen()

    async def close(self) -> None:
        await self.stop_accepting()
