"""Service broker: the app connects to a local port; the broker finds the service.

    broker = Broker([KVRegistry(kv, "services/cache/"), DNSResolver("_redis._tcp.cache")],
                    port=6380)
    await broker.start()

A logical service name resolves to endpoints through one or more `Resolver`s, whose
results are merged:
- `StaticResolver`: a fixed list (flags or the spec);
- `EnvResolver`: `<NAME>_SERVICE_HOST` and `<NAME>_SERVICE_PORT`, as `podkit up` and
  Kubernetes set them;
- `DNSResolver`: SRV records (`_service._proto.name`), or A/AAAA records with a port;
- `KVRegistry`: instances register themselves under a KV prefix, one key per endpoint
  with the value `host:port`, under a lease (`Registration`); the prefix is watched, so
  a registration or a deregistration applies at once.

The broker forwards bytes both ways and nothing else, so it serves HTTP, Redis,
PostgreSQL or any TCP protocol. Each connection goes to the next healthy endpoint in
round-robin order. A connect that fails (refused, timed out), or an upstream that closes
before sending a single byte, moves the connection to the next endpoint, replaying what
the client had sent (up to 64 KiB): while any endpoint is alive, the client sees no
error. A failed endpoint is marked down for a back-off period (doubling on each failure
in a row) and a re-resolve is started; endpoints are also re-resolved every `refresh`
seconds. Endpoints that are down are still tried, last, when no healthy one answers.
A resolver that fails keeps its last endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from podkit.aio import stop_task, wait_for
from podkit.ambassador import dns
from podkit.backends import KV, BackendError, open_kv
from podkit.clock import Clock, SystemClock
from podkit.net.hosts import is_host
from podkit.net.relay import Endpoint, Relay


class ResolveError(Exception):
    """A resolver could not produce endpoints: the message names it and says why."""


def parse_endpoint(text: str) -> Endpoint:
    """`host:port` or `[v6]:port` -> (host, port); raises ValueError naming the text."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not is_host(host.strip("[]")):
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


def format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def env_name(service: str) -> str:
    """The environment prefix of a service: upper case, non-alphanumerics as `_`."""
    return "".join(c if c.isalnum() else "_" for c in service).upper()


class Resolver(Protocol):
    """A source of endpoints for one logical service."""

    description: str

    async def resolve(self) -> list[Endpoint]:
        """The current endpoints; raises `ResolveError` when the source fails."""
        ...

    async def watch(self, changed: Callable[[], None]) -> None:
        """Call `changed()` whenever the endpoints may have changed, until cancelled;
        return at once if the source cannot push changes (it is polled instead)."""
        ...


class StaticResolver:
    """A fixed list of endpoints."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self.description = "static " + ",".join(format_endpoint(e) for e in self.endpoints)

    async def resolve(self) -> list[Endpoint]:
        return list(self.endpoints)

    async def watch(self, changed: Callable[[], None]) -> None:
        return None


class EnvResolver:
    """`<NAME>_SERVICE_HOST` with `<NAME>_SERVICE_PORT` (or `..._PORT_<PORT_NAME>`)."""

    def __init__(
        self,
        service: str,
        port_name: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.prefix = env_name(service)
        self.port_var = f"{self.prefix}_SERVICE_PORT" + (
            f"_{env_name(port_name)}" if port_name else ""
        )
        self.environ = os.environ if environ is None else environ
        self.description = f"env {self.prefix}_SERVICE_HOST/{self.port_var}"

    async def resolve(self) -> list[Endpoint]:
        host = self.environ.get(f"{self.prefix}_SERVICE_HOST")
        port = self.environ.get(self.port_var)
        if not host or not port:
            raise ResolveError(f"{self.description}: not set")
        try:
            return [parse_endpoint(f"{host}:{port}")]
        except ValueError as exc:
            raise ResolveError(f"{self.description}: {exc}") from None

    async def watch(self, changed: Callable[[], None]) -> None:
        return None


class DNSResolver:
    """SRV records of `name` (when `port` is None), or its A and AAAA records with `port`.

    With `server` (host, port), every query goes to that name server over UDP. Without
    it, SRV queries go to the first name server of /etc/resolv.conf and address lookups
    go through the system resolver (getaddrinfo, so /etc/hosts counts). SRV targets take
    their addresses from the reply's additional records when present. Records are
    ordered by priority, then weight; all of them are used.
    """

    def __init__(
        self,
        name: str,
        port: int | None = None,
        server: tuple[str, int] | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.name = name
        self.port = port
        self.server = server
        self.timeout = timeout
        kind = "SRV" if port is None else f"A/AAAA port {port}"
        self.description = f"dns {kind} {name}" + (f" @{server[0]}:{server[1]}" if server else "")

    def _server(self) -> tuple[str, int]:
        return self.server or dns.system_nameservers()[0]

    async def _addresses(self, host: str, port: int, known: list[dns.Record]) -> list[Endpoint]:
        found = [
            r.data for r in known if r.name.lower() == host.lower() and r.type in (dns.A, dns.AAAA)
        ]
        if found:
            return [(str(a), port) for a in found]
        if self.server is not None:
            out: list[Endpoint] = []
            for qtype in (dns.A, dns.AAAA):
                with contextlib.suppress(dns.DNSError):
                    reply = await dns.query(self.server, host, qtype, self.timeout)
                    out += [(str(r.data), port) for r in reply.answers if r.type == qtype]
            return out
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return []
        return list(dict.fromkeys((str(i[4][0]), port) for i in infos))

    async def resolve(self) -> list[Endpoint]:
        try:
            if self.port is not None:
                endpoints = await self._addresses(self.name, self.port, [])
            else:
                reply = await dns.query(self._server(), self.name, dns.SRV, self.timeout)
                srvs = sorted(
                    (r.data for r in reply.answers if isinstance(r.data, dns.SRVData)),
                    key=lambda s: (s.priority, -s.weight),
                )
                endpoints = []
                for srv in srvs:
                    endpoints += await self._addresses(srv.target, srv.port, reply.additional)
        except dns.DNSError as exc:
            raise ResolveError(f"{self.description}: {exc}") from None
        if not endpoints:
            raise ResolveError(f"{self.description}: no addresses")
        return list(dict.fromkeys(endpoints))

    async def watch(self, changed: Callable[[], None]) -> None:
        return None


class KVRegistry:
    """Endpoints registered under `prefix` of a KV backend (one key each, value
    `host:port`); the prefix is watched from the store's revision at the last resolve,
    so a change made before the watch is up is not missed. `kv` is a KV or a URL."""

    def __init__(self, kv: KV | str, prefix: str, log: Callable[[str], None] | None = None) -> None:
        self._kv = kv if not isinstance(kv, str) else None
        self._owned = isinstance(kv, str)
        self.url = kv if isinstance(kv, str) else kv.url
        self.prefix = prefix
        self.log = log
        self.description = f"registry {self.url} prefix {prefix!r}"
        self._revision: int | None = None  # the store's revision at the last resolve

    async def _open(self) -> KV:
        if self._kv is None:
            self._kv = await open_kv(self.url)
        return self._kv

    async def resolve(self) -> list[Endpoint]:
        try:
            kv = await self._open()
            revision = await kv.revision()
            entries = await kv.range(self.prefix)
            self._revision = revision  # a watch started later begins after it
        except (BackendError, OSError) as exc:
            raise ResolveError(f"{self.description}: {exc}") from None
        out: list[Endpoint] = []
        for entry in entries:
            try:
                out.append(parse_endpoint(entry.value.decode()))
            except (ValueError, UnicodeDecodeError):
                if self.log:
                    self.log(f"{self.description}: key {entry.key!r}: {entry.value!r} ignored")
        return out

    async def watch(self, changed: Callable[[], None]) -> None:
        start = None if self._revision is None else self._revision + 1
        try:
            kv = await self._open()
            async for _ in kv.watch(self.prefix, prefix=True, start_revision=start):
                changed()
        except (BackendError, OSError) as exc:
            raise ResolveError(f"{self.description}: watch failed: {exc}") from None

    async def close(self) -> None:
        if self._kv is not None and self._owned:
            await self._kv.close()
            self._kv = None


class Registration:
    """An instance's entry in a `KVRegistry`: `prefix + id` = `host:port` under a lease
    of `ttl` seconds, renewed every `ttl / 3`; `close()` revokes it (deregistration)."""

    def __init__(
        self,
        kv: KV,
        prefix: str,
        endpoint: Endpoint,
        ttl: float = 5.0,
        instance: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.kv = kv
        self.key = prefix + (instance or uuid.uuid4().hex[:12])
        self.endpoint = endpoint
        self.ttl = ttl
        self.clock = clock or SystemClock()
        self.lease: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Registration:
        await self._register()
        self._task = asyncio.create_task(self._renew())
        return self

    async def _renew(self) -> None:
        while True:
            await self.clock.sleep(self.ttl / 3)
            try:
                alive = self.lease is not None and await self.kv.keep_alive(self.lease)
                if not alive:  # expired (e.g. a long outage): register again
                    await self._register()
            except (BackendError, OSError):
                continue

    async def _register(self) -> None:
        self.lease = await self.kv.grant(self.ttl)
        await self.kv.put(self.key, format_endpoint(self.endpoint).encode(), lease=self.lease)

    async def close(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        if self.lease is not None:
            with contextlib.suppress(BackendError, OSError):
                await self.kv.revoke(self.lease)
            self.lease = None

    async def __aenter__(self) -> Registration:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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
        self.resolvers = list(resolvers)
        self.refresh_interval = refresh
        self.wait_for_endpoint = wait_for_endpoint
        self.clock = clock or SystemClock()
        self.log = log
        self.endpoints = EndpointSet(down_for, max_down_for)
        self.failed_connections = 0
        self.last_errors: dict[str, str | None] = {r.description: None for r in self.resolvers}
        self._known: list[list[Endpoint]] = [[] for _ in self.resolvers]
        self._wake = asyncio.Event()
        self._have_endpoints = asyncio.Event()

    def poke(self) -> None:
        """Re-resolve now (a watch saw a change, or an endpoint failed)."""
        self._wake.set()

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
        results = await asyncio.gather(
            *(r.resolve() for r in self.resolvers), return_exceptions=True
        )
        for i, (resolver, result) in enumerate(zip(self.resolvers, results, strict=True)):
            if isinstance(result, BaseException):
                if not isinstance(result, ResolveError | OSError):
                    raise result
                message = str(result)
                if self.last_errors[resolver.description] != message:
                    self.log(f"{message} (keeping {len(self._known[i])} endpoints)")
                self.last_errors[resolver.description] = message
            else:
                self._known[i] = result
                self.last_errors[resolver.description] = None
        merged = [e for known in self._known for e in known]
        if self.endpoints.update(merged):
            self.log(f"endpoints: {', '.join(map(format_endpoint, merged)) or 'none'}")
        if merged:
            self._have_endpoints.set()
        else:
            self._have_endpoints.clear()
        return merged

    async def _refresher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), self.refresh_interval)
            self._wake.clear()
            await self.refresh()
            await asyncio.sleep(0.02)  # coalesce bursts of changes

    async def _watcher(self, resolver: Resolver) -> None:
        delay = 0.1
        while True:
            try:
                await resolver.watch(self.poke)
                return
            except (ResolveError, OSError) as exc:
                self.log(f"{exc}; watching again in {delay:.1f}s")
            await self.clock.sleep(delay)
            delay = min(5.0, delay * 2)
            self.poke()

    async def start(self) -> None:
        """Resolve once, start watching and listening."""
        await self.refresh()
        self.spawn(self._refresher())
        for resolver in self.resolvers:
            self.spawn(self._watcher(resolver))
        await self.listen()

    def status(self) -> dict[str, Any]:
        """Endpoints with their health, resolver errors and counters (for /status)."""
        now = self.clock.now()
        return {
            "listen": f"{self.host}:{self.port}",
            "accepted": self.accepted,
            "failed_connections": self.failed_connections,
            "resolvers": self.last_errors,
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
        for resolver in self.resolvers:
            closer = getattr(resolver, "close", None)
            if closer is not None:
                await closer()
