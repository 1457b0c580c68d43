"""Sessions, locks, leader election and fencing over any `KV` backend.

The design follows etcd's client/v3/concurrency: a `Session` owns one lease kept alive in
the background; a candidate writes its own key `<prefix><name>/<lease>` in one
create-if-absent, then waits only for the deletion of the key created just before its
own, so candidates queue in creation order and nobody stampedes when the leader goes.
The leader's key's create revision is its fencing token: strictly increasing across
successive holders, because leadership passes in creation order.

Clock assumptions: a holder measures its lease from the moment it *sent* the request
that granted or renewed it (the server starts counting later, never earlier), on its
own monotonic clock, and stops acting at `deadline = sent + ttl - margin`. This is safe
while the holder's clock runs no more than `margin / ttl` slower than the server's and
the process notices its deadline (a paused process does not: that is what fencing
tokens are for: a resource that checks tokens rejects a paused ex-leader's late writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from podkit.aio import stop_task, wait_for
from podkit.backends.base import KV, BackendError, Entry
from podkit.clock import Clock, SystemClock

PREFIX = "podkit/election/"


class LeadershipLost(Exception):
    """The lease behind a lock or a leadership ended (expired, revoked or unreachable)."""


class StaleToken(Exception):
    """A write carried a fencing token older than one the resource has already seen."""


class Session:
    """One lease, kept alive in the background, with a local deadline (also `Lease`).

    `valid` turns False when the backend says the lease is gone, or when the local
    deadline passes without a successful renewal (the backend may be unreachable).
    """

    def __init__(
        self,
        kv: KV,
        ttl: float,
        *,
        clock: Clock | None = None,
        margin: float | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.kv = kv
        self.ttl = ttl
        self.clock: Clock = clock or SystemClock()
        self.margin = min(ttl / 4, 0.5) if margin is None else margin
        self.lease = 0
        self.deadline = 0.0
        self.lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Session:
        sent = self.clock.now()
        self.lease = await self.kv.grant(self.ttl)
        self.deadline = sent + self.ttl - self.margin
        self._tasks = [
            asyncio.create_task(self._keep_alive()),
            asyncio.create_task(self._watch_deadline()),
        ]
        return self

    @property
    def valid(self) -> bool:
        """True while the lease is ours by the local clock."""
        return not self.lost.is_set() and self.clock.now() < self.deadline

    def remaining(self) -> float:
        """Seconds until the local deadline (negative when passed)."""
        return self.deadline - self.clock.now()

    async def _keep_alive(self) -> None:
        interval = self.ttl / 3
        while not self.lost.is_set():
            await self.clock.sleep(interval)
            sent = self.clock.now()
            try:
                alive = await wait_for(self.kv.keep_alive(self.lease), interval)
            except (BackendError, OSError, TimeoutError):
                continue  # unreachable: keep trying until the deadline says otherwise
            if not alive:
                self.lost.set()
                return
            self.deadline = max(self.deadline, sent + self.ttl - self.margin)

    async def _watch_deadline(self) -> None:
        while not self.lost.is_set():
            left = self.remaining()
            if left <= 0:
                self.lost.set()
                return
            await self.clock.sleep(min(left, self.ttl / 10))

    async def close(self, *, revoke: bool = True) -> None:
        """Stop renewing; with `revoke`, end the lease now (its keys vanish)."""
        for task in self._tasks:
            await stop_task(task)
        was_valid = self.valid
        self.lost.set()
        if revoke and was_valid:
            with contextlib.suppress(BackendError, OSError, TimeoutError):
                await wait_for(self.kv.revoke(self.lease), self.ttl)

    async def __aenter__(self) -> Session:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


Lease = Session  # the same thing, by the name of what it holds


@dataclass(frozen=True)
class Leader:
    """Who holds an election or lock, and its fencing token."""

    identity: str
    token: int
    key: str


async def _wait_deleted(kv: KV, key: str, after: int, session: Session) -> None:
    """Return when `key` is deleted (from revision `after`), or raise if the session ends."""
    watch = kv.watch(key, start_revision=after + 1)
    lost = asyncio.create_task(session.lost.wait())

    async def deleted() -> None:
        async for event in watch:
            if event.kind == "delete":
                return

    waiter = asyncio.create_task(deleted())
    try:
        done, _ = await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            raise LeadershipLost(f"session lease {session.lease} ended while waiting")
        waiter.result()
    finally:
        for t in (waiter, lost):
            t.cancel()
        with contextlib.suppress(Exception):
            await watch.aclose()  # type: ignore[attr-defined]


class _Queue:
    """The candidate queue under one prefix: create own key, wait for predecessors."""

    def __init__(self, kv: KV, prefix: str, session: Session, value: bytes) -> None:
        self.kv = kv
        self.prefix = prefix
        self.session = session
        self.value = value
        self.key = f"{prefix}{session.lease:016x}"
        self.created = 0

    async def join(self) -> None:
        rev = await self.kv.create(self.key, self.value, lease=self.session.lease)
        if rev is None:  # already queued in this session (a retried campaign)
            entry = await self.kv.get(self.key)
            if entry is None:
                raise LeadershipLost(f"{self.key} vanished: the session lease has ended")
            self.created = entry.created
        else:
            self.created = rev

    async def wait_first(self) -> None:
        """Block until our key has the smallest create revision under the prefix."""
        while True:
            if not self.session.valid:
                raise LeadershipLost(f"session lease {self.session.lease} ended")
            seen = await self.kv.revision()  # a deletion after the read is not missed
            entries = await self.kv.range(self.prefix)
            mine = [e for e in entries if e.key == self.key]
            if not mine:
                raise LeadershipLost(f"{self.key} vanished: the session lease has ended")
            before = [e for e in entries if e.created < self.created]
            if not before:
                return
            pred = max(before, key=lambda e: e.created)
            await _wait_deleted(self.kv, pred.key, seen, self.session)

    async def leave(self) -> None:
        with contextlib.suppress(BackendError, OSError):
            await self.kv.delete(self.key)


def _leader(entries: list[Entry]) -> Leader | None:
    """The candidate whose key was created first leads."""
    if not entries:
        return None
    first = min(entries, key=lambda e: e.created)
    return Leader(_identity(first.value), first.created, first.key)


class Lock:
    """A distributed mutex: `async with Lock(kv, "jobs/report", ttl=10) as lock:`.

    `lock.token` is the fencing token to pass to every resource written under the lock;
    `lock.valid` turns False when the lease is lost, after which the holder must stop.
    """

    def __init__(
        self,
        kv: KV,
        name: str,
        ttl: float = 10.0,
        *,
        session: Session | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.kv = kv
        self.name = name
        self.ttl = ttl
        self._own_session = session is None
        self.session = session or Session(kv, ttl, clock=clock)
        self._queue: _Queue | None = None
        self.token = 0

    @property
    def valid(self) -> bool:
        return self._queue is not None and self.session.valid

    async def acquire(self, timeout: float | None = None) -> int:
        """Wait for the lock; return the fencing token."""
        if self._own_session and not self.session.lease:
            await self.session.start()
        self._queue = _Queue(self.kv, f"{PREFIX}lock/{self.name}/", self.session, b"")
        await self._queue.join()
        try:
            await wait_for(self._queue.wait_first(), timeout)
        except BaseException:
            await self._queue.leave()
            self._queue = None
            raise
        self.token = self._queue.created
        return self.token

    async def release(self) -> None:
        if self._queue is not None:
            await self._queue.leave()
            self._queue = None
        if self._own_session:
            await self.session.close()

    async def __aenter__(self) -> Lock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


Callback = Callable[["Leader"], Awaitable[None] | None]


class Election(Protocol):
    """What the elector component needs: `LeaderElection` and `KubeLeaseElection`."""

    identity: str

    @property
    def is_leader(self) -> bool: ...

    @property
    def token(self) -> int: ...

    @property
    def margin(self) -> float: ...

    async def campaign(self, timeout: float | None = None) -> Leader: ...

    async def wait_lost(self) -> None: ...

    async def resign(self) -> None: ...

    async def current_leader(self) -> Leader | None: ...


class LeaderElection:
    """Leader election among candidates sharing `name`.

    election = LeaderElection(kv, "scheduler", identity="pod-1", ttl=5)
    await election.campaign()          # returns when this candidate leads
    ... while election.is_leader: do the singleton work, passing election.token ...
    await election.resign()
    """

    def __init__(
        self,
        kv: KV,
        name: str,
        identity: str,
        ttl: float = 10.0,
        *,
        clock: Clock | None = None,
        on_gain: Callback | None = None,
        on_loss: Callback | None = None,
    ) -> None:
        self.kv = kv
        self.name = name
        self.identity = identity
        self.ttl = ttl
        self.clock = clock
        self.prefix = f"{PREFIX}{name}/"
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.session: Session | None = None
        self._queue: _Queue | None = None
        self.leader: Leader | None = None
        self._loss_task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        """True while this candidate leads by its local deadline."""
        return self.leader is not None and self.session is not None and self.session.valid

    @property
    def token(self) -> int:
        """The fencing token of this candidate's leadership (0 when not leading)."""
        return self.leader.token if self.is_leader and self.leader else 0

    @property
    def margin(self) -> float:
        """Seconds between the local deadline and the lease's end on the server."""
        return self.session.margin if self.session else 0.0

    async def wait_lost(self) -> None:
        """Return when the current leadership ends (at once if not leading)."""
        if self.session is not None and self.leader is not None:
            await self.session.lost.wait()

    async def campaign(self, timeout: float | None = None) -> Leader:
        """Join the queue and wait until this candidate leads."""
        if self.session is None or not self.session.valid:
            self.session = await Session(self.kv, self.ttl, clock=self.clock).start()
        value = json.dumps({"identity": self.identity}).encode()
        self._queue = _Queue(self.kv, self.prefix, self.session, value)
        await self._queue.join()
        try:
            await wait_for(self._queue.wait_first(), timeout)
        except BaseException:
            await self._queue.leave()
            raise
        self.leader = Leader(self.identity, self._queue.created, self._queue.key)
        self._loss_task = asyncio.create_task(self._watch_loss(self.session, self.leader))
        await self._call(self.on_gain, self.leader)
        return self.leader

    async def _watch_loss(self, session: Session, leader: Leader) -> None:
        await session.lost.wait()
        if self.leader is leader:
            self.leader = None
            await self._call(self.on_loss, leader)

    async def _call(self, cb: Callback | None, leader: Leader) -> None:
        if cb is not None:
            result = cb(leader)
            if asyncio.iscoroutine(result):
                await result

    async def resign(self) -> None:
        """Give up leadership (or leave the queue); the next candidate takes over.

        `on_loss` runs before the key is released, so the work stops first."""
        leader, self.leader = self.leader, None
        if self._loss_task is not None:
            self._loss_task.cancel()
            self._loss_task = None
        if leader is not None:
            await self._call(self.on_loss, leader)
        if self._queue is not None:
            await self._queue.leave()
            self._queue = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def current_leader(self) -> Leader | None:
        """The leader as the backend sees it now, or None."""
        return _leader(await self.kv.range(self.prefix))

    async def changes(self) -> AsyncIterator[Leader | None]:
        """Yield the leader now and after every change of leadership."""
        start = await self.kv.revision() + 1  # a change after the read is not missed
        current = _leader(await self.kv.range(self.prefix))
        yield current
        async for _event in self.kv.watch(self.prefix, prefix=True, start_revision=start):
            now = await self.current_leader()
            if now != current:
                current = now
                yield current


def _identity(value: bytes) -> str:
    try:
        data: Any = json.loads(value)
        return str(data["identity"])
    except (ValueError, KeyError, TypeError):
        return value.decode(errors="replace")


class FencedResource:
    """A KV-backed guard for a resource: writes carry a fencing token, and a write whose
    token is older than the newest token seen is rejected (raises `StaleToken`)."""

    def __init__(self, kv: KV, key: str) -> None:
        self.kv = kv
        self.key = key

    async def write(self, token: int, value: bytes) -> int:
        """Store `value` if `token` is not stale; return the store revision of the write."""
        while True:
            entry = await self.kv.get(self.key)
            if entry is None:
                rev = await self.kv.create(self.key, _fenced(token, value))
            else:
                seen, _ = _unfenced(entry.value)
                if token < seen:
                    raise StaleToken(f"{self.key}: token {token} is older than {seen}")
                rev = await self.kv.update(self.key, _fenced(token, value), revision=entry.revision)
            if rev is not None:
                return rev  # else someone wrote in between: read again

    async def read(self) -> tuple[int, bytes] | None:
        """The newest (token, value), or None."""
        entry = await self.kv.get(self.key)
        return None if entry is None else _unfenced(entry.value)


def _fenced(token: int, value: bytes) -> bytes:
    return token.to_bytes(8, "big") + value


def _unfenced(raw: bytes) -> tuple[int, bytes]:
    return int.from_bytes(raw[:8], "big"), raw[8:]
