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
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any

from podkit.net.proxy.hooks import BaseFilter
from podkit.net.server import Request
from podkit.observe.admin import AdminServer, Route


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


# -- the data plane: a balancer policy and a filter over podkit.lb -------------------------


class SplitPolicy:
    """A `podkit.lb` policy: the user's arm first, round-robin inside it. When every
    upstream of the arm is down the request goes to another arm (counted as a fallback)
    rather than fail: availability comes before stickiness."""

    name = "split"

    def __init__(self, splitter: Splitter, key: UserKey, arms: Mapping[str, Sequence[str]]) -> None:
        self.splitter = splitter
        self.key = key
        self.arm_names = {arm: list(names) for arm, names in arms.items()}
        self.by_arm: dict[str, list[Any]] = {}
        self._next: dict[str, int] = {}
        self.fallbacks = 0

    def set_upstreams(self, upstreams: list[Any]) -> None:
        by_name = {u.name: u for u in upstreams}
        self.by_arm = {
            arm: [by_name[n] for n in names if n in by_name]
            for arm, names in self.arm_names.items()
        }

    def _from(self, arm: str, exclude: set[Any] | None) -> Any:
        ups = self.by_arm.get(arm, [])
        start = self._next.get(arm, 0)
        for i in range(len(ups)):
            u = ups[(start + i) % len(ups)]
            if u.available and (exclude is None or u not in exclude):
                self._next[arm] = (start + i + 1) % len(ups)
                return u
        return None

    def pick(self, head: Any, client: str, exclude: set[Any] | None = None) -> Any:
        arm = self.splitter.choose(self.key.read(head.headers, client))
        up = self._from(arm.name, exclude)
        if up is None:
            for other in self.splitter.arms:
                if other is not arm and (up := self._from(other.name, exclude)) is not None:
                    self.fallbacks += 1
                    break
        return up

    def arm_of(self, upstream: Any) -> str:
        for arm, ups in self.by_arm.items():
            if upstream in ups:
                return arm
        return "?"


class SplitMetrics(BaseFilter):
    """An engine filter counting each arm's answers by status class, with Prometheus
    metrics `podkit_ambassador_split_requests_total{arm,code}` and
    `podkit_ambassador_split_weight{arm}`."""

    def __init__(self, policy: SplitPolicy) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.policy = policy
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "podkit_ambassador_split_requests",
            "Answers by arm and status class (error: no answer).",
            ["arm", "code"], registry=self.registry,
        )  # fmt: skip
        self.weight = Gauge("podkit_ambassador_split_weight", "Weight of each arm.", ["arm"],
                            registry=self.registry)  # fmt: skip
        self.fallback = Counter("podkit_ambassador_split_fallbacks", "Requests sent to another arm "
                                "because theirs was down.", registry=self.registry)  # fmt: skip
        self._fallbacks = 0

    def on_done(self, ex: Any, upstream: Any, status: int | None, error: str | None) -> None:
        arm = self.policy.arm_of(upstream)
        code = "error" if status is None else f"{status // 100}xx"
        self.requests.labels(arm=arm, code=code).inc()
        if status is None or status >= 500:
            for a in self.policy.splitter.arms:
                if a.name == arm:
                    a.errors += 1

    def status(self) -> dict[str, Any]:
        s = self.policy.splitter
        return {
            "experiment": s.experiment,
            "arms": [
                {
                    "name": a.name,
                    "weight": a.weight,
                    "requests": a.requests,
                    "errors": a.errors,
                    "upstreams": self.policy.arm_names[a.name],
                }
                for a in s.arms
            ],
            "fallbacks": self.policy.fallbacks,
        }

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        for a in self.policy.splitter.arms:
            self.weight.labels(arm=a.name).set(a.weight)
        self.fallback.inc(self.policy.fallbacks - self._fallbacks)
        self._fallbacks = self.policy.fallbacks
        return generate_latest(self.registry)


def split_admin(
    policy: SplitPolicy, metrics: SplitMetrics, host: str, port: int, log: Any
) -> AdminServer:
    """The admin server: GET /status, /metrics, /healthz, /readyz, /weights; PUT (or POST)
    /weights {arm: w} sets the weights."""

    def weights(req: Request) -> tuple[int, Any]:
        if req.method in (b"GET", b"HEAD"):
            return 200, policy.splitter.weights()
        try:
            body = json.loads(req.body or b"null")
            if not isinstance(body, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in body.values()
            ):
                raise ValueError('expected a JSON object of numbers, like {"canary": 20}')
            policy.splitter.set_weights(body)
        except ValueError as exc:  # json.JSONDecodeError is one
            return 400, {"error": str(exc)}
        log(f"weights now {policy.splitter.weights()}")
        return 200, policy.splitter.weights()

    routes: dict[str, Any] = {
        "/status": lambda: (200, metrics.status()),
        "/metrics": lambda: (200, metrics.exposition()),
        "/weights": Route(weights, (b"GET", b"HEAD", b"PUT", b"POST")),
    }
    return AdminServer(routes, host, port, name="podkit ambassador split")
