"""Scaling decisions on an injected clock, and the progress reports they read."""

from __future__ import annotations

import uuid

import pytest

from podkit.backends import open_kv
from podkit.workqueue.scaling import (
    DemandMeter,
    ProgressReporter,
    ScalePolicy,
    Scaler,
    read_progress,
)


def test_policy_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="min <= max"):
        ScalePolicy(min=5, max=2)


def test_scales_up_to_drain_the_backlog_in_time() -> None:
    s = Scaler(ScalePolicy(min=1, max=10, target_drain=10, cooldown_up=5, cooldown_down=30))
    s.observe(0, 0, 1)
    s.observe(1, 20, 1)  # one replica does 20 items/s
    assert s.per_replica == pytest.approx(20)
    # 1,000 items / (20/s x 10 s) = 5 replicas
    assert s.desired(1, backlog=1000, current=1) == 5
    # within the up cool-down: hold
    assert s.desired(3, backlog=5000, current=5) == 5
    # after it: up again, capped at max
    assert s.desired(6.5, backlog=5000, current=5) == 10


def test_scales_down_only_after_a_quiet_spell() -> None:
    s = Scaler(ScalePolicy(min=1, max=10, target_drain=10, cooldown_up=5, cooldown_down=30))
    s.per_replica = 20.0
    assert s.desired(0, backlog=2000, current=2) == 10
    assert s.desired(10, backlog=0, current=10) == 10  # quiet begins
    assert s.desired(25, backlog=0, current=10) == 10
    assert s.desired(30, backlog=2000, current=10) == 10  # a burst resets the quiet spell
    assert s.desired(35, backlog=0, current=10) == 10
    assert s.desired(64, backlog=0, current=10) == 10
    assert s.desired(65.5, backlog=0, current=10) == 1  # 30 s of quiet: down to min


def test_without_a_rate_it_probes_upward_and_never_leaves_the_bounds() -> None:
    s = Scaler(ScalePolicy(min=0, max=3, target_drain=10, cooldown_up=0, cooldown_down=0))
    assert s.desired(0, backlog=50, current=0) == 1
    assert s.desired(1, backlog=50, current=1) == 2
    assert s.desired(2, backlog=50, current=3) == 3
    assert s.desired(3, backlog=0, current=3) == 0


def test_rate_ignores_a_worker_that_vanished() -> None:
    s = Scaler(ScalePolicy())
    s.observe(0, 100, 2)
    assert s.observe(1, 60, 1) is None  # a worker's report expired: the sum dropped
    assert s.observe(2, 90, 1) == pytest.approx(30)


async def test_progress_reports_round_trip() -> None:
    kv = await open_kv(f"memory://progress-{uuid.uuid4().hex}")
    a = ProgressReporter(kv, "jobs", every=0.05)
    a.key += "-a"
    b = ProgressReporter(kv, "jobs", every=0.05)
    b.key += "-b"
    a.done, b.done = 10, 32
    a.start()
    b.start()
    import asyncio

    await asyncio.sleep(0.2)
    assert await read_progress(kv, "jobs") == (42, 2)
    await a.close()
    assert await read_progress(kv, "jobs") == (32, 1)
    await b.close()
    await kv.close()


def test_demand_meter_asks_for_the_replicas_that_drain_in_time() -> None:
    """What the HPA/KEDA metric publishes: no cool-downs of its own, the rate learned."""
    meter = DemandMeter(ScalePolicy(min=1, max=20, target_drain=30, cooldown_down=600))
    first = meter.update(0.0, backlog=900, done_total=0, workers=2)
    assert first.rate is None and first.desired == 3  # no rate yet: one more than now
    d = meter.update(10.0, backlog=900, done_total=200, workers=2)  # 20/s, 10/s each
    assert d.rate == pytest.approx(20.0) and d.per_replica == pytest.approx(10.0)
    assert d.desired == 3  # 900 items / (10/s x 30 s)
    d = meter.update(20.0, backlog=5_000, done_total=400, workers=2)
    assert d.desired == 17  # ceil(5000 / 300)
    d = meter.update(30.0, backlog=0, done_total=600, workers=2)
    assert d.desired == 1  # at once: the autoscaler keeps the cool-down
    assert meter.update(40.0, backlog=10**9, done_total=800, workers=2).desired == 20
