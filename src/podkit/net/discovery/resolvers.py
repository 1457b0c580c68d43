"""The resolvers: each finds a service's instances one way (see `podkit.net.discovery`).

An endpoint is `(host, port)`, written `host:port` or `[v6]:port`. File and registry
entries are endpoints unless a `parse` reads them otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Generic, Protocol

from typing_extensions import TypeVar

from podkit.aio import stop_task
from podkit.backends import KV, BackendError, open_kv
from podkit.clock import Clock, SystemClock
from podkit.net.discovery import dns
from podkit.net.hosts import is_host
from podkit.net.relay import Endpoint

T = TypeVar("T", default=Endpoint)


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


class Resolver(Protocol[T]):
    """A source of endpoints (or of entries, `T`) for one logical service."""

    description: str

    async def resolve(self) -> list[T]:
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
    ordered by priority, then weight; all of them are used. The addresses of one name are
    sorted, so a server that rotates its answers does not look like a change.
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
        """`host`'s addresses with `port`: from `known` records, else asked; OSError when
        the system resolver fails."""
        found = [
            str(r.data)
            for r in known
            if r.name.lower() == host.lower() and r.type in (dns.A, dns.AAAA)
        ]
        if not found and self.server is not None:
            for qtype in (dns.A, dns.AAAA):
                with contextlib.suppress(dns.DNSError):
                    reply = await dns.query(self.server, host, qtype, self.timeout)
                    found += [str(r.data) for r in reply.answers if r.type == qtype]
        elif not found:
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            found = [str(i[4][0]) for i in infos]
        return [(a, port) for a in sorted(set(found))]

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
                    with contextlib.suppress(OSError):  # a target with no address is left out
                        endpoints += await self._addresses(srv.target, srv.port, reply.additional)
        except (dns.DNSError, OSError) as exc:
            raise ResolveError(f"{self.description}: {exc}") from None
        if not endpoints:
            raise ResolveError(f"{self.description}: no addresses")
        return list(dict.fromkeys(endpoints))

    async def watch(self, changed: Callable[[], None]) -> None:
        return None


# ---------------------------------------------------------------------------- members file


class MembersError(ValueError):
    """A members file that cannot be used; the message names the file and line."""


def parse_members(
    text: str,
    source: str = "<members>",
    parse: Callable[[str], T] = parse_endpoint,  # type: ignore[assignment]
    name: Callable[[T], str] = format_endpoint,  # type: ignore[assignment]
) -> list[T]:
    """One entry a line (blank lines and `# comments` ignored) -> what `parse` makes of
    each; MembersError names the first bad line, or one whose `name` came before."""
    out: list[T] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            entry = parse(line)
        except ValueError as exc:
            raise MembersError(f"{source}:{n}: {exc}") from None
        key = name(entry)
        if key in seen:
            raise MembersError(f"{source}:{n}: {key} is listed twice")
        seen.add(key)
        out.append(entry)
    return out


def write_members(path: Path, entries: Iterable[str]) -> None:
    """Replace a members file atomically (what a supervisor calls on every change)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{e}\n" for e in entries), encoding="utf-8")
    os.replace(tmp, path)


class FileResolver(Generic[T]):
    """The entries of a members file (`parse_members`), read again when its inode, size
    or modification time changed. A file with a bad line is refused whole: it raises
    `ResolveError` naming the line until the file changes again."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        parse: Callable[[str], T] = parse_endpoint,  # type: ignore[assignment]
        name: Callable[[T], str] = format_endpoint,  # type: ignore[assignment]
    ) -> None:
        self.path = Path(path)
        self.parse = parse
        self.name = name
        self.description = f"members file {self.path}"
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[T] = []
        self._error: str | None = None  # why the file as stamped was refused

    def _read(self) -> list[T]:
        try:
            st = self.path.stat()
        except OSError as exc:
            self._stamp = None
            raise ResolveError(f"{self.description} unreadable: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                text = self.path.read_text(encoding="utf-8")
                self._entries = parse_members(text, str(self.path), self.parse, self.name)
                self._error = None
            except (MembersError, OSError, UnicodeDecodeError) as exc:
                self._error = f"{self.description} refused: {exc}"
        if self._error is not None:
            raise ResolveError(self._error)
        return list(self._entries)

    async def resolve(self) -> list[T]:
        return self._read()

    async def watch(self, changed: Callable[[], None]) -> None:
        return None


# ---------------------------------------------------------------------------- KV registry


class KVRegistry(Generic[T]):
    """Endpoints registered under `prefix` of a KV backend (one key each, value
    `host:port`, or what `parse` reads); a value that does not parse is skipped and
    logged. The prefix is watched from the store's revision at the last resolve, so a
    change made before the watch is up is not missed. `kv` is a KV or a URL."""

    def __init__(
        self,
        kv: KV | str,
        prefix: str,
        log: Callable[[str], None] | None = None,
        parse: Callable[[str], T] = parse_endpoint,  # type: ignore[assignment]
    ) -> None:
        self._kv = kv if not isinstance(kv, str) else None
        self._owned = isinstance(kv, str)
        self.url = kv if isinstance(kv, str) else kv.url
        self.prefix = prefix
        self.log = log
        self.parse = parse
        self.description = f"registry {self.url} prefix {prefix!r}"
        self._revision: int | None = None  # the store's revision at the last resolve

    async def _open(self) -> KV:
        if self._kv is None:
            self._kv = await open_kv(self.url)
        return self._kv

    async def resolve(self) -> list[T]:
        try:
            kv = await self._open()
            revision = await kv.revision()
            entries = await kv.range(self.prefix)
            self._revision = revision  # a watch started later begins after it
        except (BackendError, OSError) as exc:
            raise ResolveError(f"{self.description}: {exc}") from None
        out: list[T] = []
        for entry in entries:
            try:
                out.append(self.parse(entry.value.decode()))
            except ValueError as exc:  # a UnicodeDecodeError too
                if self.log:
                    self.log(f"{self.description}: key {entry.key!r} ignored: {exc}")
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
