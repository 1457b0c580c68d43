"""Injected time: every lease, TTL, retry and back-off in podkit reads a `Clock`."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds and a way to wait for them."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real monotonic clock."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when told to; sleepers wake when `advance` passes their time."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock."""
        return sum(1 for _, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline is reached, in order."""
        target = self._now + seconds
        while True:
            due = sorted(
                ((t, f) for t, f in self._sleepers if t <= target and not f.done()),
                key=lambda tf: tf[0],
            )
            if not due:
                break
            t, fut = due[0]
            self._now = max(self._now, t)
            fut.set_result(None)
            self._sleepers = [(tt, ff) for tt, ff in self._sleepers if not ff.done()]
            for _ in range(5):  # let woken tasks run and possibly sleep again
                await asyncio.sleep(0)
        self._now = target
        for _ in range(5):
            await asyncio.sleep(0)


class WallClock(SystemClock):
    """Seconds since the epoch: for deadlines shared between processes (SQLite, Redis)."""

    def now(self) -> float:
        return time.time()
