"""Work queues under faults: worker processes killed with kill -9, a backend restart.

Three worker processes (concurrency 16, visibility 3 s) drain a queue on a private Redis
(AOF, appendfsync always) or nats-server (JetStream file storage); every 1-3 s one of them
is killed with SIGKILL and replaced, and once, half way through, the server is restarted
on the same port and data dir. Every item's effect must be recorded at least once (none
lost), none dead-lettered, and items enqueued twice with the same key held once.
Duplicated effects are expected (an effect happens before its ack) and printed.

On NATS an item delivered to a worker killed before the driver's visibility NAK went out
stays hidden for the consumer's ack_wait (30 s), not the 3 s visibility: such a run takes
about 30 s longer (the item is not lost).

The CI version runs 3,000 items (100 ms each) per backend; `-m slow` runs 100,000 on Redis,
as `python tests/faults/queue_chaos.py --items 100000 --backend redis` does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from faults.queue_chaos import chaos
from podkit.backends import Message
from podkit.workqueue import WorkQueue

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.mark.parametrize("backend", ["redis", "nats"])
async def test_no_item_is_lost_to_kills_and_a_backend_restart(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await chaos(backend, 3000, work_ms=100, workdir=tmp_path, timeout=120)
    with capsys.disabled():
        print(f"\n{backend}: {result.summary()}")
    assert result.lost == [], result.details()
    assert result.dead == 0, result.details()
    assert result.keyed == 1500 and result.keyed_enqueued_once, result.details()
    assert result.unknown == 0, result.details()
    assert not result.crashed and not result.hung and not result.timed_out, result.details()
    assert result.final_stats == (0, 0, 0)
    assert result.kills >= 2 and result.restarts == 1  # the faults did happen


@pytest.mark.slow
async def test_100k_items_on_redis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = await chaos("redis", 100_000, workdir=tmp_path)
    with capsys.disabled():
        print(f"\nredis: {result.summary()}")
    assert result.ok, result.details()
    assert result.kills >= 5 and result.restarts == 1


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_graceful_stop_acks_items_whose_ack_was_on_its_way(
    kind: str, tmp_path: Path
) -> None:
    """Stopping while a batch of acks is in flight (a slow backend) must still ack them:
    finished items are neither left in flight nor handled again after the visibility."""
    url = f"memory://stop-{uuid.uuid4().hex}" if kind == "memory" else f"sqlite:///{tmp_path}/q.db"
    wq = await WorkQueue.open(url, "stop", visibility=30)
    await wq.enqueue_many(list(range(4)))
    real_ack = wq.queue.ack

    async def slow_ack(messages: Sequence[Message]) -> None:
        await asyncio.sleep(0.5)
        await real_ack(messages)

    wq.queue.ack = slow_ack  # type: ignore[method-assign]
    done: list[int] = []

    async def handler(item: int) -> None:
        done.append(item)

    task = asyncio.create_task(wq.run(handler, concurrency=4))
    while len(done) < 4:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the batch of acks is on its way
    wq.stop()
    stats = await asyncio.wait_for(task, 5)
    s = await wq.stats()
    assert stats.done == 4 and (s.depth, s.in_flight) == (0, 0)
    await wq.close()
