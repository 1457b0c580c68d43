"""Service broker: the app connects to a local port; the broker finds the service.

    broker = Broker([KVRegistry(kv, "services/cache/"), DNSResolver("_redis._tcp.cache")],
                    port=6380)
    await broker.start()

A logical service name resolves to endpoints through one or more resolvers of
`podkit.net.discovery` (static, environment, DNS, KV registry; re-exported here), whose
results a `Follower` merges. A resolver that fails keeps its last endpoints.

The broker forwards bytes both ways and nothing else, so it serves HTTP, Redis,
PostgreSQL or any TCP protocol. Each connection goes to the next healthy endpoint in
round-robin order. A connect that fails (refused, timed out), or an upstream that closes
before sending a single byte, moves the connection to the next endpoint, replaying what
the client had sent (up to 64 KiB): while any endpoint is alive, the client sees no
error. A failed endpoint is marked down for a back-off period (doubling on each failure
in a row) and a re-resolve is started; endpoints are also re-resolved every `refresh`
seconds, and at once when a registry's watch sees a change. Endpoints that are down are
still tried, last, when no healthy one answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from podkit.aio import stop_task, wait_for
from podkit.clock import Clock, SystemClock
from podkit.net.discovery import *  # noqa: F403  (the resolvers, also under this name)
from podkit.net.discovery import Follower, Resolver, format_endpoint
from podkit.net.relay import Endpoint, Relay

# ---------------------------------------------------------------------------- choosing


@dataclass
class EndpointState:
    """Health bookkeeping of one endpoint."""

    endpoint: Endpoint
    down_until: float = 0.0
    failures: int = 0  # in a row
    connections: int = 0
    errors: int = 0


class EndpointSet:
    """Round-robin over healthy endpoints, with down-marking and back-off (sans-IO: the
    caller passes the time)."""

    def __init__(self, down_for: float = 1.0, max_down_for: float = 30.0) -> None:
        self.down_for = down_for
        self.max_down_for = max_down_for
        self.states: dict[Endpoint, EndpointState] = {}
        self._order: list[Endpoint] = []
        self._next = 0

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._order)

    def update(self, endpoints: Iterable[Endpoint]) -> bool:
        """Replace the set, keeping the state of endpoints that stay; True if it changed."""
        new = list(dict.fromkeys(endpoints))
        if new == self._order:
            return False
        self.states = {e: self.states.get(e) or EndpointState(e) for e in new}
        self._order = new
        return True

    def candidates(self, now: float) -> list[Endpoint]:
        """Endpoints to try in order: healthy ones round-robin from the next turn, then
        the down ones, soonest back first. Advances the turn."""
        n = len(self._order)
        if n == 0:
            return []
        start = self._next % n
        rotated = self._order[start:] + self._order[:start]
        healthy = [e for e in rotated if self.states[e].down_until <= now]
        down = sorted(
            (e for e in rotated if self.states[e].down_until > now),
            key=lambda e: self.states[e].down_until,
        )
        first = (healthy or down)[0]
        self._next = self._order.index(first) + 1  # the turn after the chosen one
        return healthy + down

    def failed(self, endpoint: Endpoint, now: float) -> float:
        """Mark `endpoint` down; return for how long."""
        state = self.states.get(endpoint)
        if state is None:
            return 0.0
        period = min(self.max_down_for, self.down_for * 2.0**state.failures)
        state.failures += 1
        state.errors += 1
        state.down_until = now + period
        return period

    def succeeded(self, endpoint: Endpoint) -> None:
        state = self.states.get(endpoint)
        if state is not None:
            state.failures = 0
            state.down_until = 0.0
            state.connections += 1

    def healthy(self, now: float) -> list[Endpoint]:
        return [e for e in self._order if self.states[e].down_until <= now]


# ---------------------------------------------------------------------------- forwarding


def _stderr_log(message: str) -> None:
    print(f"ambassador broker: {message}", file=sys.stderr, flush=True)


class Broker(Relay):
    """Listens on `host:port` and forwards each connection to an endpoint of the service
    (`podkit.net.relay`: replayed to the next endpoint if one fails before answering)."""

    def __init__(
        self,
        resolvers: Sequence[Resolver],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        refresh: float = 5.0,
        connect_timeout: float = 1.0,
        down_for: float = 1.0,
        max_down_for: float = 30.0,
        wait_for_endpoint: float = 2.0,
        clock: Clock | None = None,
        log: Callable[[str], None] = _stderr_log,
    ) -> None:
        super().__init__(host, port, connect_timeout=connect_timeout)
        self.wait_for_endpoint = wait_for_endpoint
        self.clock = clock or SystemClock()
        self.log = log
        self.endpoints = EndpointSet(down_for, max_down_for)
        self.failed_connections = 0
        self.discovery = Follower(
            resolvers, self._set_endpoints, interval=refresh, clock=self.clock, log=log
        )
        self._have_endpoints = asyncio.Event()

    def poke(self) -> None:
        """Re-resolve now (an endpoint failed)."""
        self.discovery.poke()

    def failed(self, endpoint: Endpoint) -> None:
        period = self.endpoints.failed(endpoint, self.clock.now())
        self.log(f"{format_endpoint(endpoint)} failed: down for {period:.1f}s")
        self.poke()

    def succeeded(self, endpoint: Endpoint) -> None:
        super().succeeded(endpoint)
        self.endpoints.succeeded(endpoint)

    def gave_up(self, tried: int) -> None:
        self.failed_connections += 1
        self.log(f"no endpoint answered ({tried} tried); closing a client")

    async def candidates(self, tried: set[Endpoint]) -> list[Endpoint]:
        if not self.endpoints.endpoints:
            with contextlib.suppress(TimeoutError):
                await wait_for(self._have_endpoints.wait(), self.wait_for_endpoint)
        return [e for e in self.endpoints.candidates(self.clock.now()) if e not in tried]

    async def refresh(self) -> list[Endpoint]:
        """Ask every resolver; a failing one keeps its last endpoints. The merged list."""
        return await self.discovery.refresh()

    def _set_endpoints(self, merged: list[Endpoint]) -> None:
        if self.endpoints.update(merged):
            self.log(f"endpoints: {', '.join(map(format_endpoint, merged)) or 'none'}")
        if merged:
            self._have_endpoints.set()
        else:
            self._have_endpoints.clear()

    async def start(self) -> None:
        """Resolve once, start watching and listening."""
        await self.refresh()
        self.spawn(self.discovery.run())
        await self.listen()

    def status(self) -> dict[str, Any]:
        """Endpoints with their health, resolver errors and counters (for /status)."""
        now = self.clock.now()
        return {
            "listen": f"{self.host}:{self.port}",
            "accepted": self.accepted,
            "failed_connections": self.failed_connections,
            "resolvers": self.discovery.last_errors,
            "endpoints": [
                {
                    "endpoint": format_endpoint(s.endpoint),
                    "healthy": s.down_until <= now,
                    "down_for": round(max(0.0, s.down_until - now), 3),
                    "connections": s.connections,
                    "errors": s.errors,
                }
                for s in self.endpoints.states.values()
            ],
        }

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            await stop_task(task)
        self.close_connections()
        await self.discovery.close()
