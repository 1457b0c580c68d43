"""Running coroutines from synchronous entry points."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """`await aw` with a timeout (TimeoutError), never swallowing a cancellation.

    asyncio.wait_for in Python 3.11 returns the result instead of raising CancelledError
    when the awaited thing completes just as the caller is cancelled; a loop that is
    stopped by cancelling it would then run on."""
    async with asyncio.timeout(timeout):
        return await aw


def stop_event() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets (call it inside the running loop)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it, cancelling again if it swallowed the first one
    (asyncio.wait_for in Python 3.11 can, when its inner wait completes at that moment)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    retrieve(task)


def retrieve(future: asyncio.Future[Any]) -> None:
    """Take a finished future's outcome, so that its error is not reported as unseen."""
    if not future.cancelled():
        future.exception()


def discard(future: asyncio.Future[Any]) -> None:
    """Give up a future without waiting: cancel it when pending, else take its outcome."""
    if future.done():
        retrieve(future)
    else:
        future.cancel()
