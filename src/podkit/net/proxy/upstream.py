"""Upstreams and the policy that picks one, as the proxy engine sees them.

`Upstream` is one replica (address, weight, in-flight count, availability, the engine's
connection pool to it); `parse_upstream` reads `http://host:port[,weight=N]`. A `Policy`
answers `pick(head, client, exclude)`: an available upstream not in `exclude` (those a
retry already tried), or None. `RoundRobin` is the engine's default; the balancer's other
policies are in `podkit.lb.policy`. `choose` is the engine's whole choice for one try:
the policy's pick among the upstreams not tried yet, passed by the filters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import urlsplit

from podkit.net.hosts import is_host
from podkit.net.http import RequestHead
from podkit.net.pool import ConnectionPool


class Upstream:
    """One replica behind the balancer."""

    __slots__ = ("available", "current", "host", "inflight", "name", "pool", "port", "weight")

    def __init__(self, host: str, port: int, weight: int = 1) -> None:
        if weight < 1:
            raise ValueError(f"upstream {host}:{port}: weight must be >= 1, got {weight}")
        self.host = host
        self.port = port
        self.weight = weight
        self.name = f"{host}:{port}"
        self.inflight = 0  # requests sent and not yet answered
        self.available = True  # ready, not ejected, not draining
        self.current = 0  # smooth weighted round-robin state
        self.pool: ConnectionPool[Any] | None = None  # the proxy's, once it serves

    def __repr__(self) -> str:
        w = f" weight={self.weight}" if self.weight != 1 else ""
        return f"<Upstream {self.name}{w}{'' if self.available else ' unavailable'}>"


def parse_upstream(spec: str) -> Upstream:
    """`http://host:port`, `host:port`, with an optional `,weight=N` (or `*N`)."""
    weight = 1
    text = spec.strip()
    if "," in text:
        text, _, opt = text.partition(",")
        key, _, value = opt.partition("=")
        if key.strip() != "weight" or not value.strip().isdigit():
            raise ValueError(f"upstream {spec!r}: expected URL or URL,weight=N")
        weight = int(value)
    elif "*" in text:
        text, _, value = text.rpartition("*")
        if not value.isdigit():
            raise ValueError(f"upstream {spec!r}: expected URL*N for a weight")
        weight = int(value)
    if "://" not in text:
        text = "http://" + text
    url = urlsplit(text)
    if url.scheme != "http":
        raise ValueError(f"upstream {spec!r}: only http:// upstreams are supported")
    if url.path not in ("", "/") or url.query:
        raise ValueError(f"upstream {spec!r}: a path or query is not supported")
    try:
        port = url.port or 80
    except ValueError:
        raise ValueError(f"upstream {spec!r}: invalid port") from None
    if not url.hostname:
        raise ValueError(f"upstream {spec!r}: no host")
    if not is_host(url.hostname):
        raise ValueError(f"upstream {spec!r}: {url.hostname!r} is not a host name or address")
    return Upstream(url.hostname, port, weight)


class Policy(Protocol):
    name: str

    def set_upstreams(self, upstreams: list[Upstream]) -> None: ...

    def pick(
        self, head: RequestHead, client: str, exclude: set[Upstream] | None = None
    ) -> Upstream | None: ...


class RoundRobin:
    name = "round-robin"

    def __init__(self, upstreams: Iterable[Upstream] = ()) -> None:
        self.upstreams: list[Upstream] = []
        self._next = 0
        self.set_upstreams(list(upstreams))

    def set_upstreams(self, upstreams: list[Upstream]) -> None:
        self.upstreams = list(upstreams)
        self._next = 0

    def pick(
        self, head: RequestHead, client: str, exclude: set[Upstream] | None = None
    ) -> Upstream | None:
        ups = self.upstreams
        n = len(ups)
        i = self._next
        if exclude is None and i < n:  # the common case: the next one is available
            u = ups[i]
            if u.available:
                self._next = i + 1
                return u
        for _ in range(n):
            if i >= n:
                i = 0
            u = ups[i]
            i += 1
            if u.available and (exclude is None or u not in exclude):
                self._next = i
                return u
        return None


class Admits(Protocol):
    """Whether a try may go to `upstream` (an `Exchange` asks its filters)."""

    def admits(self, upstream: Upstream) -> bool: ...


def choose(
    policy: Policy,
    head: RequestHead,
    client: str,
    tried: set[Upstream] | None = None,
    judge: Admits | None = None,
) -> Upstream | None:
    """The upstream for a try: the policy's pick among those not `tried` yet (among all
    again once each was tried), then, while `judge` refuses it, the next pick without
    the refused ones. None when nothing is left."""
    up = policy.pick(head, client, tried)
    if up is None and tried:
        up = policy.pick(head, client)  # every one was tried: try again afresh
    if judge is None:
        return up
    refused: set[Upstream] | None = None
    while up is not None and not judge.admits(up):
        if refused is None:
            refused = set(tried) if tried else set()
        refused.add(up)
        up = policy.pick(head, client, refused)
    return up
