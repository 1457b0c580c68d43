"""The balancer's membership: what `podkit.net.discovery` finds, as `Upstream`s.

Each source is followed, so replicas can come and go (and register themselves) without
a restart:

- `FileMembers`: a members file, one upstream per line as `--upstream` takes it
  (`http://host:port`, optional `,weight=N`); blank lines and `# comments` are ignored.
  Rewrite it atomically (`write_members`: temp file + rename, as `podkit up` does); a
  change is seen within `interval`. A file with a bad line is refused whole (the error
  names the line) and the last good list stays.
- `KVMembers`: a KV prefix, each key one upstream in the same syntax; instances put
  their own key under a lease (`podkit.net.discovery.Registration`), so a crashed one
  disappears when its lease ends. The watch resumes after reconnects, and the prefix is
  read again every `interval`; a malformed value is skipped with a log line.
- `DNSMembers`: every address of a name, re-resolved every `interval` (a headless
  Service's name on Kubernetes lists exactly the ready pods).

A list is applied when its names or weights changed. An empty list is applied too: the
balancer then answers 503 until members return. A source that fails keeps the last list.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Generic, TypeVar

from podkit.backends import KV
from podkit.lb.policy import Upstream, parse_upstream
from podkit.net.discovery import (
    DNSResolver,
    FileResolver,
    Follower,
    KVRegistry,
    MembersError,
    Resolver,
    write_members,
)
from podkit.net.discovery import parse_members as parse_entries
from podkit.net.relay import Endpoint

__all__ = [
    "DNSMembers",
    "FileMembers",
    "KVMembers",
    "Members",
    "MembersError",
    "OnChange",
    "parse_members",
    "write_members",
]

OnChange = Callable[[list[Upstream]], None]
T = TypeVar("T")


def _quiet(_: str) -> None:
    return None


def _name(upstream: Upstream) -> str:
    return upstream.name


def _same(upstream: Upstream) -> Upstream:
    return upstream


def _from_endpoint(endpoint: Endpoint) -> Upstream:
    return Upstream(*endpoint)


def parse_members(text: str, source: str = "<members>") -> list[Upstream]:
    """Lines of upstreams -> Upstream objects; MembersError names the first bad line."""
    return parse_entries(text, source, parse_upstream, _name)


class Members(Generic[T]):
    """Follows one source; makes an `Upstream` of each entry it finds and calls
    `on_change` with the list when it differs from the last one applied."""

    def __init__(
        self,
        resolver: Resolver[T],
        upstream: Callable[[T], Upstream],
        on_change: OnChange,
        *,
        interval: float,
        log: Callable[[str], None],
    ) -> None:
        self.resolver = resolver
        self.upstream = upstream
        self.on_change = on_change
        self.applied: list[tuple[str, int]] | None = None  # names and weights
        self.follower = Follower([resolver], self._apply, interval=interval, log=log)

    def _apply(self, found: list[T]) -> None:
        upstreams = [self.upstream(entry) for entry in found]
        applied = [(u.name, u.weight) for u in upstreams]
        if applied != self.applied:
            self.applied = applied
            self.on_change(upstreams)

    @property
    def last_error(self) -> str | None:
        """Why the source failed at the last resolve, or None."""
        return self.follower.last_errors[self.resolver.description]

    async def check(self) -> bool:
        """Resolve now; True when a new list was applied."""
        before = self.applied
        await self.follower.refresh()
        return self.applied is not before

    async def run(self) -> None:
        """Resolve now, then follow the source until cancelled."""
        await self.follower.refresh()
        await self.follower.run()

    async def close(self) -> None:
        await self.follower.close()


class FileMembers(Members[Upstream]):
    """A members file, checked every `interval` seconds."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_change: OnChange,
        *,
        interval: float = 0.25,
        log: Callable[[str], None] = _quiet,
    ) -> None:
        resolver = FileResolver(path, parse_upstream, _name)
        super().__init__(resolver, _same, on_change, interval=interval, log=log)


class KVMembers(Members[Upstream]):
    """A watched KV prefix (`kv` a KV or a URL), also read again every `interval`."""

    def __init__(
        self,
        kv: KV | str,
        prefix: str,
        on_change: OnChange,
        *,
        interval: float = 5.0,
        log: Callable[[str], None] = _quiet,
    ) -> None:
        resolver = KVRegistry(kv, prefix, log, parse_upstream)
        super().__init__(resolver, _same, on_change, interval=interval, log=log)


class DNSMembers(Members[Endpoint]):
    """Every address of `name`, with `port`, resolved every `interval` seconds."""

    def __init__(
        self,
        name: str,
        port: int,
        on_change: OnChange,
        *,
        interval: float = 1.0,
        log: Callable[[str], None] = _quiet,
    ) -> None:
        resolver = DNSResolver(name, port)
        super().__init__(resolver, _from_endpoint, on_change, interval=interval, log=log)
