"""Dynamic scaling of worker replicas from queue depth and processing rate.

Workers report how many items they finished (`report_progress`), under a lease so a dead
worker's report vanishes. The scaler sums those counts into a processing rate, learns
the rate of one replica, and asks for enough replicas to drain the backlog within
`target_drain` seconds, between `min` and `max`. It scales up at once (after
`cooldown_up` since the last change) and down only after the backlog has asked for
fewer replicas for `cooldown_down` seconds, so a short lull does not kill workers.
Time is injected: every decision takes `now`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
from dataclasses import dataclass, field

from podkit.backends import KV, BackendError

REPORTS = "podkit/queue-workers/"


@dataclass(frozen=True)
class ScalePolicy:
    """Bounds and pace of scaling."""

    min: int = 1
    max: int = 8
    target_drain: float = 30.0  # seconds to work off the backlog
    cooldown_up: float = 5.0
    cooldown_down: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.max:
            raise ValueError(f"need 0 <= min <= max, got min={self.min} max={self.max}")
        if self.target_drain <= 0:
            raise ValueError("target_drain must be positive")


@dataclass
class Scaler:
    """Decides the replica count; feed it `observe(...)`, ask `desired(...)`."""

    policy: ScalePolicy
    per_replica: float | None = None  # items/s one replica does (learned)
    last_change: float = -math.inf
    low_since: float | None = None
    _last_done: tuple[float, int] | None = field(default=None, repr=False)

    def observe(self, now: float, done_total: int, busy_replicas: int) -> float | None:
        """Record the workers' finished-item total; return the recent rate (items/s)."""
        rate = None
        if self._last_done is not None:
            t0, d0 = self._last_done
            if now > t0 and done_total >= d0:
                rate = (done_total - d0) / (now - t0)
                if busy_replicas > 0 and rate > 0:
                    sample = rate / busy_replicas
                    self.per_replica = (
                        sample
                        if self.per_replica is None
                        else 0.7 * self.per_replica + 0.3 * sample
                    )
        self._last_done = (now, done_total)
        return rate

    def desired(self, now: float, backlog: int, current: int) -> int:
        """The replica count to run now, given the backlog (depth + in flight)."""
        p = self.policy
        if backlog <= 0:
            want = p.min
        elif self.per_replica is None or self.per_replica <= 0:
            want = max(current, 1) + (1 if current > 0 else 0)  # no rate yet: probe upward
        else:
            want = math.ceil(backlog / (self.per_replica * p.target_drain))
        want = max(p.min, min(p.max, want))
        if want > current:
            self.low_since = None
            if now - self.last_change >= p.cooldown_up:
                self.last_change = now
                return want
            return current
        if want < current:
            if self.low_since is None:
                self.low_since = now
            if now - self.low_since >= p.cooldown_down and now - self.last_change >= p.cooldown_up:
                self.last_change = now
                self.low_since = None
                return want
            return current
        self.low_since = None
        return current


def worker_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class ProgressReporter:
    """Writes a worker's finished-item count under a lease, every `every` seconds."""

    def __init__(self, kv: KV, queue: str, *, every: float = 1.0, ttl: float = 10.0) -> None:
        self.kv = kv
        self.key = f"{REPORTS}{queue}/{worker_identity()}"
        self.every = every
        self.ttl = ttl
        self.done = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        lease = None
        while True:
            with contextlib.suppress(BackendError, OSError):
                if lease is None or not await self.kv.keep_alive(lease):
                    lease = await self.kv.grant(self.ttl)
                await self.kv.put(self.key, json.dumps({"done": self.done}).encode(), lease=lease)
            await asyncio.sleep(self.every)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(BackendError, OSError):
            await self.kv.delete(self.key)


async def read_progress(kv: KV, queue: str) -> tuple[int, int]:
    """(sum of finished counts, number of live workers) from the reports of `queue`."""
    total = 0
    workers = 0
    for entry in await kv.range(f"{REPORTS}{queue}/"):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            total += int(json.loads(entry.value)["done"])
            workers += 1
    return total, workers


@dataclass(frozen=True)
class Demand:
    """What a queue needs now: `desired` replicas for its backlog and rate."""

    desired: int
    backlog: int
    workers: int
    rate: float | None  # items/s finished by all workers, None until two samples
    per_replica: float | None  # items/s of one replica, learned


class DemandMeter:
    """The replica count a queue needs, for an autoscaler that keeps its own cool-downs
    (a Kubernetes HPA or KEDA): a `Scaler` without cool-downs, fed the queue's backlog and
    the workers' progress reports."""

    def __init__(self, policy: ScalePolicy) -> None:
        self.scaler = Scaler(ScalePolicy(policy.min, policy.max, policy.target_drain, 0.0, 0.0))

    def update(self, now: float, backlog: int, done_total: int, workers: int) -> Demand:
        """Feed one sample (`workers` = replicas reporting now); return the demand."""
        rate = self.scaler.observe(now, done_total, workers)
        desired = self.scaler.desired(now, backlog, workers)
        return Demand(desired, backlog, workers, rate, self.scaler.per_replica)
