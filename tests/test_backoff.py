"""Restart back-off, tested with an injected clock: no sleeping."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

from podkit.clock import ManualClock
from podkit.system.backoff import RestartBackoff
from podkit.system.probes import ProbeState
from podkit.system.runtime import LogSink, Runtime
from podkit.system.spec import parse_spec
from support import unique_subnet, wait_for


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_good_run() -> None:
    b = RestartBackoff(initial=0.5, factor=2, maximum=4, reset_after=10)
    delays = []
    for t in range(6):
        b.started(t)
        delays.append(b.exited(t + 1))  # each run lasts 1 s: a crash loop
    assert delays == [0.5, 1, 2, 4, 4, 4]
    b.started(100)
    assert b.exited(115) == 0.5  # ran 15 s >= reset_after: healthy again


def test_probe_state_needs_consecutive_results() -> None:
    s = ProbeState(success_threshold=2, failure_threshold=3)
    assert [s.record(ok) for ok in (True, False, True, True)] == [False, False, False, True]
    assert s.healthy
    assert [s.record(ok) for ok in (False, False, True, False, False, False)] == [
        False,
        False,
        False,
        False,
        False,
        True,
    ]
    assert not s.healthy


async def test_crash_loop_restarts_follow_the_backoff_on_the_injected_clock(
    tmp_path: Path,
) -> None:
    spec = parse_spec(
        f"""
name: crashy
pods:
  - name: job
    containers:
      - name: c
        command: [{sys.executable}, -c, "import sys; sys.exit(3)"]
"""
    )
    clock = ManualClock()
    rt = Runtime(
        spec,
        base_dir=tmp_path,
        clock=clock,
        log=LogSink(io.StringIO()),
        subnet=unique_subnet(),
        backoff={"initial": 1.0, "factor": 2.0, "maximum": 4.0},
    )
    await rt.start()
    runner = rt.replicas[0].containers[0]
    try:
        for restarts, delay in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0)):
            await wait_for(lambda r=restarts: runner.status.restarts == r and clock.sleepers > 0)
            assert runner.status.state == "backoff"
            assert runner.status.exit_code == 3
            assert runner.status.message == f"restarting in {delay:.2f}s"
            await clock.advance(delay * 0.9)
            await asyncio.sleep(0.2)
            # not restarted before its delay
            assert runner.status.restarts == restarts and runner.status.state == "backoff"
            await clock.advance(delay * 0.1)
    finally:
        await rt.stop()
