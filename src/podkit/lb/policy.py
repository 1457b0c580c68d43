"""Balancing policies: which upstream gets the next request.

Every policy answers `pick(head, client, exclude)`: an available upstream not in `exclude`
(the ones a retry already tried), or None. An upstream is available when it is ready,
not ejected and not draining (`Upstream.available`); health checks and outlier ejection
flip that flag, the policies only read it.

- `RoundRobin` (the engine's own, `podkit.net.proxy.upstream`): the next available
  upstream in turn.
- `Weighted`: smooth weighted round-robin (nginx's): weight 3 gets 3 of every 4 picks
  beside a weight 1, interleaved rather than in bursts.
- `LeastRequests`: power of two choices: two upstreams at random, the one with fewer
  requests in flight (per unit of weight) wins. Near-best balance, O(1), no herding.
- `ConsistentHash`: a hash ring (`podkit.ring`) keyed on a header, a cookie or the client
  IP. Each upstream owns `160 * weight` points placed by hashing its own name, so a
  replica that leaves moves only the keys it owned (to the next points on the ring) and
  one that joins takes only keys from its neighbours. A key on an unavailable upstream
  walks on to the next available one, and comes back when the upstream does.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from podkit.net.http import RequestHead
from podkit.net.proxy.upstream import Policy, RoundRobin, Upstream, parse_upstream
from podkit.ring import Ring

__all__ = [
    "POLICIES",
    "ConsistentHash",
    "LeastRequests",
    "Policy",
    "RoundRobin",
    "Upstream",
    "Weighted",
    "make_policy",
    "parse_upstream",
]


class Weighted(RoundRobin):
    """Smooth weighted round-robin."""

    name = "weighted"

    def pick(
        self, head: RequestHead, client: str, exclude: set[Upstream] | None = None
    ) -> Upstream | None:
        best: Upstream | None = None
        total = 0
        for u in self.upstreams:
            if not u.available or (exclude is not None and u in exclude):
                continue
            u.current += u.weight
            total += u.weight
            if best is None or u.current > best.current:
                best = u
        if best is not None:
            best.current -= total
        return best


class LeastRequests(RoundRobin):
    """Power of two choices on requests in flight per unit of weight; a tie (idle
    upstreams) goes to one of the two at random in proportion to their weights."""

    name = "least-requests"

    def __init__(
        self, upstreams: Iterable[Upstream] = (), rng: random.Random | None = None
    ) -> None:
        self._rand = (rng or random.Random()).random
        super().__init__(upstreams)

    def pick(
        self, head: RequestHead, client: str, exclude: set[Upstream] | None = None
    ) -> Upstream | None:
        ups = self.upstreams
        n = len(ups)
        rand = self._rand
        if n > 2:  # fast path: two distinct random candidates, both usable
            a = ups[int(rand() * n)]
            b = ups[int(rand() * (n - 1))]
            if b is a:
                b = ups[n - 1]
            if (
                a.available
                and b.available
                and (exclude is None or (a not in exclude and b not in exclude))
            ):
                return self._lighter(a, b)
        cands = [u for u in ups if u.available and (exclude is None or u not in exclude)]
        if len(cands) <= 2:
            if not cands:
                return None
            if len(cands) == 1:
                return cands[0]
            a, b = cands
        else:
            a, b = random.sample(cands, 2)
        return self._lighter(a, b)

    def _lighter(self, a: Upstream, b: Upstream) -> Upstream:
        """The one with fewer requests in flight per unit of weight; on a tie, one drawn
        in proportion to the weights (the first listed is not favoured)."""
        load_a = a.inflight * b.weight
        load_b = b.inflight * a.weight
        if load_a != load_b:
            return a if load_a < load_b else b
        return a if self._rand() * (a.weight + b.weight) < a.weight else b


class ConsistentHash:
    """A hash ring keyed on `header:NAME`, `cookie:NAME` or `ip` (the client address).

    A request without the header or cookie falls back to the client address.
    """

    name = "consistent-hash"
    POINTS = 160  # per unit of weight

    def __init__(self, upstreams: Iterable[Upstream] = (), on: str = "ip") -> None:
        kind, _, arg = on.partition(":")
        kind = kind.strip().lower()
        if kind not in ("header", "cookie", "ip") or (kind != "ip" and not arg.strip()):
            raise ValueError(f"--hash-on {on!r}: expected header:NAME, cookie:NAME or ip")
        self.kind = kind
        self.key_name = arg.strip().lower().encode()
        self.upstreams: list[Upstream] = []
        self.ring: Ring[Upstream] = Ring()
        self.set_upstreams(list(upstreams))

    def set_upstreams(self, upstreams: list[Upstream]) -> None:
        self.upstreams = list(upstreams)
        self.ring = Ring(((u, u.name, u.weight) for u in self.upstreams), self.POINTS)

    def key(self, head: RequestHead, client: str) -> bytes:
        if self.kind == "header":
            value = head.header(self.key_name)
            if value is not None:
                return value
        elif self.kind == "cookie":
            cookies = head.header(b"cookie")
            if cookies is not None:
                want = self.key_name
                for part in cookies.split(b";"):
                    k, _, v = part.partition(b"=")
                    if k.strip().lower() == want:
                        return v.strip()
        return client.encode()

    def owner(self, key: bytes, exclude: set[Upstream] | None = None) -> Upstream | None:
        """The available upstream owning `key` on the ring."""
        if exclude is None:
            return self.ring.owner(key, _available)
        return self.ring.owner(key, lambda u: u.available and u not in exclude)

    def pick(
        self, head: RequestHead, client: str, exclude: set[Upstream] | None = None
    ) -> Upstream | None:
        return self.owner(self.key(head, client), exclude)


POLICIES = ("round-robin", "weighted", "least-requests", "consistent-hash")


def _available(u: Upstream) -> bool:
    return u.available


def make_policy(name: str, upstreams: list[Upstream], hash_on: str | None = None) -> Policy:
    """The policy called `name` over `upstreams`."""
    if name == "round-robin":
        # With unequal weights round-robin is the weighted kind.
        if any(u.weight != 1 for u in upstreams):
            return Weighted(upstreams)
        return RoundRobin(upstreams)
    if name == "weighted":
        return Weighted(upstreams)
    if name == "least-requests":
        return LeastRequests(upstreams)
    if name == "consistent-hash":
        return ConsistentHash(upstreams, hash_on or "ip")
    raise ValueError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}")
