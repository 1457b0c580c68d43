"""podkit.aio.wait_for: a cancelled caller stays cancelled."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from podkit.aio import wait_for

WaitFor = Callable[[Awaitable[Any], float | None], Awaitable[Any]]


async def lost_cancels(wf: WaitFor, trials: int = 180) -> int:
    """Cancel a loop of short waits at every phase; count the cancels it swallowed."""
    lost = 0
    for k in range(trials):
        stopped = False

        async def short() -> int:
            await asyncio.sleep(0)
            return 1

        async def loop() -> None:
            while not stopped:  # noqa: B023 - read at each turn on purpose
                await wf(short(), 1)

        task = asyncio.create_task(loop())
        for _ in range(k % 9):  # the cancel lands at a different phase of the wait
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=0.01)
        stopped = True
        await asyncio.wait({task})
        lost += not task.cancelled()
    return lost


async def test_wait_for_never_swallows_a_cancel() -> None:
    assert await lost_cancels(wait_for) == 0


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for was fixed in 3.12")
async def test_the_check_catches_asyncio_wait_for_of_python_3_11() -> None:
    """The same check on asyncio.wait_for of 3.11 finds lost cancels: it can fail."""
    assert await lost_cancels(asyncio.wait_for) > 0


async def test_wait_for_times_out_and_returns() -> None:
    assert await wait_for(asyncio.sleep(0, "done"), 1) == "done"
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.sleep(1), 0.01)
