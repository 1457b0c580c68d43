"""`Follower`: keeps what resolvers find current and hands on the merged list."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Generic

from podkit.aio import wait_for
from podkit.clock import Clock, SystemClock
from podkit.net.discovery.resolvers import ResolveError, Resolver, T


def _quiet(_: str) -> None:
    return None


class Follower(Generic[T]):
    """Resolves `resolvers` now (`refresh`), and while `run` runs: every `interval`
    seconds, on `poke()`, and whenever a resolver's watch reports a change. After a
    resolve in which a resolver answered, `on_change` gets the merged list. A resolver
    that fails keeps its last list (the failure is logged when it is new, and shown in
    `last_errors`); a watch that fails is started again after a back-off, with a resolve.
    """

    def __init__(
        self,
        resolvers: Sequence[Resolver[T]],
        on_change: Callable[[list[T]], None],
        *,
        interval: float = 5.0,
        clock: Clock | None = None,
        log: Callable[[str], None] = _quiet,
    ) -> None:
        self.resolvers = list(resolvers)
        self.on_change = on_change
        self.interval = interval
        self.clock = clock or SystemClock()
        self.log = log
        self.last_errors: dict[str, str | None] = {r.description: None for r in self.resolvers}
        self._known: list[list[T]] = [[] for _ in self.resolvers]
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Resolve again now (a watch saw a change, or an endpoint failed)."""
        self._wake.set()

    async def refresh(self) -> list[T]:
        """Ask every resolver; a failing one keeps its last list. The merged list."""
        results = await asyncio.gather(
            *(r.resolve() for r in self.resolvers), return_exceptions=True
        )
        answered = False
        for i, (resolver, result) in enumerate(zip(self.resolvers, results, strict=True)):
            if isinstance(result, BaseException):
                if not isinstance(result, ResolveError | OSError):
                    raise result
                message = str(result)
                if self.last_errors[resolver.description] != message:
                    self.log(f"{message}; keeping the last list ({len(self._known[i])})")
                self.last_errors[resolver.description] = message
            else:
                self._known[i] = result
                self.last_errors[resolver.description] = None
                answered = True
        merged = [e for known in self._known for e in known]
        if answered:
            self.on_change(merged)
        return merged

    async def _refresher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.refresh()
            await asyncio.sleep(0.02)  # coalesce bursts of changes

    async def _watcher(self, resolver: Resolver[T]) -> None:
        delay = 0.1
        while True:
            try:
                await resolver.watch(self.poke)
                return
            except (ResolveError, OSError) as exc:
                self.log(f"{exc}; watching again in {delay:.1f}s")
            await self.clock.sleep(delay)
            delay = min(5.0, delay * 2)
            self.poke()

    async def run(self) -> None:
        """Follow the resolvers until cancelled (the first resolve is `refresh`'s)."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._refresher())
            for resolver in self.resolvers:
                tasks.create_task(self._watcher(resolver))

    async def close(self) -> None:
        """Close the resolvers that hold a connection."""
        for resolver in self.resolvers:
            closer = getattr(resolver, "close", None)
            if closer is not None:
                await closer()
