"""Traffic splitting for experiments and canaries (sans-IO): weighted arms, sticky users.

A user key (a header's value, a cookie's value, or the client's IP, as `UserKey` reads
it) hashes with the experiment's name to a point `u` in [0, 1); the arms own consecutive
slices of [0, 1) in proportion to their weights, in the order given. So:

- a user always lands in the same arm while the weights stay;
- the share of users in an arm is its weight's share (each user is an independent
  uniform draw: the count in an arm over n users is Binomial(n, share));
- raising the weight of the last arm (the canary) only moves users into it, and
  lowering it only moves users out of it; nobody hops between two other arms;
- a different experiment name reshuffles users independently of other experiments.

A request with no key (no header, no cookie) is not sticky: it gets a fresh random point.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie


@dataclass(frozen=True)
class UserKey:
    """Where the user's identity is read: `header:NAME`, `cookie:NAME` or `ip`."""

    kind: str  # "header", "cookie" or "ip"
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> UserKey:
        """'header:X-User' | 'cookie:uid' | 'ip' -> UserKey (ValueError names the text)."""
        kind, _, name = text.partition(":")
        kind = kind.strip().lower()
        if kind == "ip" and not name:
            return cls("ip")
        if kind in ("header", "cookie") and name.strip():
            return cls(kind, name.strip().lower() if kind == "header" else name.strip())
        raise ValueError(f"sticky key {text!r}: expected header:NAME, cookie:NAME or ip")

    def read(self, headers: Sequence[tuple[bytes, bytes]], client_ip: str) -> str | None:
        """The user's key from a request, or None when it carries none."""
        if self.kind == "ip":
            return client_ip or None
        want = self.name.encode("latin-1") if self.kind == "header" else b"cookie"
        for k, v in headers:
            if k.lower() != want:
                continue
            if self.kind == "header":
                return v.decode("latin-1").strip() or None
            try:
                jar = SimpleCookie(v.decode("latin-1"))
            except CookieError:
                continue
            if self.name in jar and jar[self.name].value:
                return jar[self.name].value
        return None


@dataclass
class Arm:
    """One arm of an experiment and what it has served."""

    name: str
    weight: float
    requests: int = 0
    errors: int = 0  # 5xx answers and failed forwards


@dataclass
class Splitter:
    """Chooses an arm per user; weights can change at run time (`set_weights`)."""

    experiment: str
    arms: list[Arm]
    _bounds: list[float] = field(default_factory=list, repr=False)
    _salt: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"arms need distinct names, got {names}")
        self._salt = self.experiment.encode() + b"\0"
        self._rebuild()

    @classmethod
    def from_weights(cls, experiment: str, weights: Mapping[str, float]) -> Splitter:
        return cls(experiment, [Arm(n, float(w)) for n, w in weights.items()])

    def _rebuild(self) -> None:
        if any(a.weight < 0 for a in self.arms):
            raise ValueError("weights must not be negative")
        total = sum(a.weight for a in self.arms)
        if total <= 0:
            raise ValueError("at least one arm needs a positive weight")
        acc, bounds = 0.0, []
        for a in self.arms:
            acc += a.weight / total
            bounds.append(acc)
        bounds[-1] = 1.0
        self._bounds = bounds

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Change some or all weights; unknown arm names raise ValueError."""
        unknown = set(weights) - {a.name for a in self.arms}
        if unknown:
            raise ValueError(f"no arm named {sorted(unknown)}; arms: {[a.name for a in self.arms]}")
        old = [a.weight for a in self.arms]
        for a in self.arms:
            a.weight = float(weights.get(a.name, a.weight))
        try:
            self._rebuild()
        except ValueError:
            for a, w in zip(self.arms, old, strict=True):
                a.weight = w
            raise

    def point(self, key: str | None) -> float:
        """The user's point in [0, 1): stable for a key, random without one."""
        if key is None:
            return random.random()
        digest = hashlib.blake2b(self._salt + key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def choose(self, key: str | None) -> Arm:
        """The arm for this user (counts the request)."""
        i = bisect.bisect_right(self._bounds, self.point(key))
        arm = self.arms[min(i, len(self.arms) - 1)]
        arm.requests += 1
        return arm

    def weights(self) -> dict[str, float]:
        return {a.name: a.weight for a in self.arms}
