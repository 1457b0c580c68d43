"""Leader election on a Kubernetes Lease (coordination.k8s.io/v1), the way client-go does it.

Every attempt reads the Lease and writes it back with its `resourceVersion`, so two
candidates that race get one success and one 409 Conflict. A holder's Lease is taken
over only when the candidate has *observed* it unchanged for `leaseDurationSeconds` on
its own monotonic clock (not by comparing `renewTime` to its wall clock), so clock skew
between nodes does not matter. The fencing token is `leaseTransitions + 1`: it grows by
one every time the holder changes.

Leases count whole seconds (`leaseDurationSeconds` is an integer): 1 s is the shortest.
Uses lightkube (`pip install 'podkit[k8s]'`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
from dataclasses import dataclass

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from podkit.aio import wait_for
from podkit.clock import Clock, SystemClock
from podkit.election.core import Leader, LeadershipLost


@dataclass
class _Observed:
    holder: str | None
    renew: object
    at: float  # local monotonic time the record was first seen like this


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class KubeLeaseElection:
    """Leader election on the Lease `namespace/name`, with the API of `LeaderElection`."""

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        identity: str,
        *,
        namespace: str = "default",
        lease_duration: float = 15.0,
        retry_period: float | None = None,
        clock: Clock | None = None,
        margin: float | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self.identity = identity
        self.namespace = namespace
        self.duration = max(1, math.ceil(lease_duration))
        self.retry_period = retry_period or max(0.1, self.duration / 5)
        self.clock: Clock = clock or SystemClock()
        self.margin = min(self.duration / 4, 0.5) if margin is None else margin
        self.leader: Leader | None = None
        self.deadline = 0.0
        self.lost = asyncio.Event()
        self._observed: _Observed | None = None
        self._renewer: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return (
            self.leader is not None and not self.lost.is_set() and self.clock.now() < self.deadline
        )

    @property
    def token(self) -> int:
        return self.leader.token if self.is_leader and self.leader else 0

    async def wait_lost(self) -> None:
        """Return when the current leadership ends (at once if not leading)."""
        if self.leader is not None:
            await self.lost.wait()

    def _observe(self, spec: LeaseSpec | None) -> _Observed:
        holder = spec.holderIdentity if spec else None
        renew = spec.renewTime if spec else None
        seen = self._observed
        if seen is None or seen.holder != holder or seen.renew != renew:
            seen = _Observed(holder, renew, self.clock.now())
            self._observed = seen
        return seen

    async def _try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the Lease afterwards."""
        sent = self.clock.now()
        now = _now()
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            spec = LeaseSpec(
                holderIdentity=self.identity,
                leaseDurationSeconds=self.duration,
                acquireTime=now,
                renewTime=now,
                leaseTransitions=0,
            )
            try:
                await self.client.create(
                    Lease(metadata=ObjectMeta(name=self.name, namespace=self.namespace), spec=spec)
                )
            except ApiError as exc2:
                if exc2.status.code == 409:  # somebody created it first
                    return False
                raise
            self._held(sent, 0)
            return True
        spec = lease.spec or LeaseSpec()
        seen = self._observe(spec)
        holder = spec.holderIdentity or None
        mine = holder == self.identity
        duration = spec.leaseDurationSeconds or self.duration
        if holder and not mine and self.clock.now() < seen.at + duration:
            return False  # held by another, and not yet seen unchanged for a whole lease
        transitions = spec.leaseTransitions or 0
        if not mine:
            transitions += 1
            spec.acquireTime = now
        spec.holderIdentity = self.identity
        spec.renewTime = now
        spec.leaseDurationSeconds = self.duration
        spec.leaseTransitions = transitions
        lease.spec = spec
        try:
            await self.client.replace(lease)
        except ApiError as exc:
            if exc.status.code == 409:  # lost the race: somebody wrote first
                return False
            raise
        self._held(sent, transitions)
        return True

    def _held(self, sent: float, transitions: int) -> None:
        self.deadline = sent + self.duration - self.margin
        key = f"{self.namespace}/{self.name}"
        if self.leader is None or self.leader.token != transitions + 1:
            self.leader = Leader(self.identity, transitions + 1, key)

    async def campaign(self, timeout: float | None = None) -> Leader:
        """Retry every `retry_period` until this candidate holds the Lease."""

        async def loop() -> Leader:
            while True:
                try:
                    if await self._try_acquire_or_renew() and self.leader is not None:
                        return self.leader
                except ApiError:
                    pass
                except OSError:
                    pass
                await self.clock.sleep(self.retry_period)

        self.lost.clear()
        leader = await wait_for(loop(), timeout)
        self._renewer = asyncio.create_task(self._renew())
        return leader

    async def _renew(self) -> None:
        interval = self.duration / 3
        while True:
            await self.clock.sleep(min(interval, max(0.0, self.deadline - self.clock.now())))
            if self.clock.now() >= self.deadline:
                break
            try:
                ok = await wait_for(self._try_acquire_or_renew(), interval)
            except (ApiError, OSError, TimeoutError):
                continue  # unreachable: the deadline decides
            if not ok:
                break  # somebody else holds it now
        self.lost.set()
        self.leader = None

    async def resign(self) -> None:
        """Release the Lease (holder cleared), so the next candidate need not wait."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        was_leader = self.is_leader
        self.leader = None
        self.lost.set()
        if not was_leader:
            return
        with contextlib.suppress(ApiError, OSError):
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
            if lease.spec and lease.spec.holderIdentity == self.identity:
                lease.spec.holderIdentity = None
                lease.spec.leaseDurationSeconds = 1
                await self.client.replace(lease)

    async def current_leader(self) -> Leader | None:
        """The holder recorded in the Lease, or None."""
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        spec = lease.spec
        if spec is None or not spec.holderIdentity:
            return None
        return Leader(
            spec.holderIdentity, (spec.leaseTransitions or 0) + 1, f"{self.namespace}/{self.name}"
        )


__all__ = ["KubeLeaseElection", "LeadershipLost"]
