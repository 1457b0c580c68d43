"""Work queues: a shared queue of items and a pool of workers that process them.

    queue = await WorkQueue.open("sqlite:///jobs.db", name="thumbnails")
    await queue.enqueue({"path": "cat.png"}, key="cat.png")

    @queue.worker(concurrency=8)
    async def resize(item: dict) -> None: ...

    await queue.run(resize)               # until stopped; or drain=True to stop when empty

Delivery is at-least-once: an item is acked only after its handler returned. While a
handler runs, its item's visibility is extended by heartbeats, so a long item is not
handed to another worker; a worker killed at any instant loses nothing (its items
become visible again when their visibility lapses). A failed item is retried after an
exponential back-off with jitter, and dead-lettered after `max_attempts` deliveries
with its last error. Stopping gracefully finishes the items in hand, or returns them.
With `prefetch`, a worker also leases up to that many items ahead of its free slots;
they are heartbeated like the running ones and returned at once on a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from podkit.aio import wait_for
from podkit.backends import (
    KV,
    BackendError,
    Message,
    Queue,
    QueueStats,
    open_kv,
    open_queue,
)
from podkit.clock import Clock, SystemClock

Handler = Callable[[Any], Any]
log = logging.getLogger("podkit.workqueue")
ACK_LINGER = 0.005  # seconds the acker waits after an item finished, so later ones share the ack

# json.dumps(item, separators=...) without making an encoder per call; and the C scanner
# that json.loads ends in, without the Python layers around it.
_json_encode = json.JSONEncoder(separators=(",", ":")).encode
_json_scan: Callable[[str, int], tuple[Any, int]]
_json_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def encode(item: Any) -> bytes:
    """bytes stay bytes; anything else is JSON."""
    if isinstance(item, bytes | bytearray | memoryview):
        return b"\x00" + bytes(item)
    return _json_encode(item).encode()


def decode(payload: bytes) -> Any:
    if payload[:1] == b"\x00":
        return payload[1:]
    try:  # the fast path for UTF-8 JSON without surrounding whitespace, as encode() writes
        text = payload.decode()
        value, end = _json_scan(text, 0)
        if end == len(text):
            return value
    except (UnicodeDecodeError, StopIteration, ValueError, AttributeError):
        pass
    return json.loads(payload)  # anything else, and its errors


@dataclass
class RetryPolicy:
    """Back-off before a failed item is tried again: `base * 2**(attempt-1)`, capped,
    with full jitter (a random delay between half and all of it)."""

    base: float = 1.0
    maximum: float = 300.0
    jitter: bool = True

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        d = min(self.maximum, self.base * 2 ** max(0, attempt - 1))
        if self.jitter:
            d *= float((rng or random).uniform(0.5, 1.0))
        return float(d)


@dataclass
class WorkerStats:
    """What a worker pool did."""

    done: int = 0
    failed: int = 0  # handler errors (retried or dead-lettered)
    returned: int = 0  # handed back unfinished at shutdown
    outages: int = 0  # dequeues that failed because the backend did not answer
    started_at: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started_at
        return self.done / elapsed if elapsed > 0 else 0.0


class WorkQueue:
    """A named queue on any Queue backend, with workers and optional results."""

    def __init__(
        self,
        queue: Queue,
        *,
        results: KV | None = None,
        visibility: float = 30.0,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.queue = queue
        self.results = results
        self.visibility = visibility
        self.retry = retry or RetryPolicy()
        self.clock: Clock = clock or SystemClock()  # heartbeats, ack batching, back-off
        self._stop = asyncio.Event()

    @classmethod
    async def open(
        cls,
        url: str,
        name: str = "default",
        *,
        max_attempts: int = 5,
        results: str | None = None,
        visibility: float = 30.0,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        **options: Any,
    ) -> WorkQueue:
        """Open queue `name` at `url`; `results` is a KV URL to store handler results."""
        options.setdefault("visibility", visibility)  # NATS: the consumer's ack_wait
        if clock is not None:  # the drivers that keep time themselves (memory, SQLite) too
            options["clock"] = clock
        queue = await open_queue(url, name, max_attempts=max_attempts, **options)
        kv = await open_kv(results) if results else None
        return cls(queue, results=kv, visibility=visibility, retry=retry, clock=clock)

    @property
    def name(self) -> str:
        return self.queue.name

    async def enqueue(self, item: Any, *, key: str | None = None, delay: float = 0) -> str:
        """Add one item (bytes, or anything JSON can encode); `key` makes it idempotent."""
        return await self.queue.enqueue(encode(item), key=key, delay=delay)

    async def enqueue_many(
        self, items: Sequence[Any], *, keys: Sequence[str | None] | None = None
    ) -> list[str]:
        """Add many items in one round trip."""
        return await self.queue.enqueue_batch([encode(i) for i in items], keys=keys)

    async def stats(self) -> QueueStats:
        return await self.queue.stats()

    def _result_key(self, item_id: str) -> str:
        return f"podkit/results/{self.name}/{item_id}"

    async def result(self, item_id: str, timeout: float | None = None) -> Any:
        """Wait for the result a handler returned for `item_id` (needs `results`)."""
        if self.results is None:
            raise RuntimeError("this WorkQueue stores no results: open it with results=URL")
        key = self._result_key(item_id)

        async def wait() -> Any:
            results = self.results
            assert results is not None
            start = await results.revision() + 1  # a result stored after the read is seen
            entry = await results.get(key)
            if entry is not None:
                return decode(entry.value)
            async for ev in results.watch(key, start_revision=start):
                if ev.kind == "put" and ev.value is not None:
                    return decode(ev.value)
            raise RuntimeError("watch ended")

        return await wait_for(wait(), timeout)

    def worker(
        self, fn: Handler | None = None, *, concurrency: int = 8
    ) -> Callable[[Handler], Handler] | Handler:
        """Decorator marking a handler (sync or async) with its concurrency."""

        def mark(f: Handler) -> Handler:
            f.__podkit_concurrency__ = concurrency  # type: ignore[attr-defined]
            return f

        return mark(fn) if fn is not None else mark

    def stop(self) -> None:
        """Ask running workers to stop taking items and finish (see `run`)."""
        self._stop.set()

    async def run(
        self,
        handler: Handler,
        *,
        concurrency: int | None = None,
        drain: bool = False,
        grace: float = 30.0,
        on_done: Callable[[WorkerStats], None] | None = None,
        then: WorkQueue | None = None,
        prefetch: int = 0,
        stats: WorkerStats | None = None,
        on_failed: Callable[[Message, str], None] | None = None,
    ) -> WorkerStats:
        """Process items until `stop()` (or, with `drain`, until the queue is empty).

        At most `concurrency` items run at once; sync handlers run in threads. With
        `prefetch`, up to that many more are leased and wait their turn, so that one
        dequeue carries more items (worth it for short items).
        On stop, running items get `grace` seconds to finish; the rest are returned.
        With `then`, each result is enqueued there (a chain's next step) before the item
        is acked, keyed by the item's id, so a retried step forwards it only once.
        The counts go into `stats` when given (read it while the pool runs);
        `on_failed(message, error)` hears of each failed delivery.
        """
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 or more, not {prefetch}")
        marked: int = getattr(handler, "__podkit_concurrency__", 8)
        limit = concurrency if concurrency is not None else marked
        pool = _Pool(self, handler, limit, on_done, then, prefetch)
        pool.on_failed = on_failed
        if stats is not None:
            pool.stats = stats
        return await pool.run(drain=drain, grace=grace)

    async def close(self) -> None:
        await self.queue.close()
        if self.results is not None:
            await self.results.close()


class _Pool:
    """One worker process's loop: fetch, run, heartbeat, settle."""

    def __init__(
        self,
        wq: WorkQueue,
        handler: Handler,
        limit: int,
        on_done: Callable[[WorkerStats], None] | None,
        then: WorkQueue | None = None,
        prefetch: int = 0,
    ) -> None:
        self.wq = wq
        self.then = then
        self.handler = handler
        call = getattr(handler, "__call__", None)  # noqa: B004 - async callable objects too
        self.is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)
        self.limit = limit
        self.prefetch = prefetch
        self.on_done = on_done
        self.on_failed: Callable[[Message, str], None] | None = None
        self.stats = WorkerStats()
        self.in_hand: dict[str, Message] = {}  # leased: running or waiting
        self.waiting: deque[Message] = deque()  # leased ahead, not started yet
        self.running = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.freed = asyncio.Event()  # set when an item leaves our hands, and on stop
        self.fetch: asyncio.Task[list[Message]] | None = None  # the dequeue under way
        self.acks: list[Message] = []
        self.ack_due = asyncio.Event()

    async def run(self, *, drain: bool, grace: float) -> WorkerStats:
        q = self.wq.queue
        piggyback = getattr(q, "dequeue_acks", False)
        outage = 0
        beat = asyncio.create_task(self._heartbeat())
        acker = asyncio.create_task(self._acker())
        stop = asyncio.create_task(self._on_stop())
        me = asyncio.current_task()
        assert me is not None
        try:
            while not self.wq._stop.is_set():
                free = self.limit + self.prefetch - len(self.in_hand)
                # Wait for a free slot (stop sets `freed` too), and with prefetch until the
                # items leased ahead have started, so that the next dequeue takes a batch.
                if free <= 0 or self.waiting:
                    self.freed.clear()
                    await self.freed.wait()
                    continue
                # A task of its own, so that stop can cancel a dequeue waiting for items.
                # It carries the acks due so far where that costs no round trip.
                acks: list[Message] = []
                if piggyback:
                    acks, self.acks = self.acks, []
                wait = 0.5 if not drain else 0
                fetch = self.fetch = asyncio.create_task(
                    q.dequeue(free, visibility=self.wq.visibility, wait=wait, ack=acks)
                )
                try:
                    messages = await fetch
                    outage = 0
                    acks = []
                except asyncio.CancelledError:
                    if fetch.cancelled() and self.wq._stop.is_set() and not me.cancelling():
                        break  # stopped while waiting for items
                    raise
                except (BackendError, OSError) as exc:  # the backend is away: wait, retry
                    outage += 1
                    self.stats.outages += 1
                    if outage == 1:
                        log.warning("queue %s unavailable, retrying: %s", self.wq.name, exc)
                    with contextlib.suppress(TimeoutError):
                        await wait_for(self.wq._stop.wait(), min(5.0, 0.2 * 2**outage))
                    continue
                finally:
                    self.fetch = None
                    if acks:  # maybe not sent: send them again (acking twice is harmless)
                        self.acks = acks + self.acks
                        self.ack_due.set()
                if self.wq._stop.is_set():  # delivered as we stopped: hand them back
                    for m in messages:
                        with contextlib.suppress(Exception):
                            await q.nack(m)
                    break
                if not messages:
                    if drain and not self.in_hand:
                        await self._flush_acks()  # not in flight any more: let stats see it
                        s = await q.stats()
                        if s.depth == 0 and s.in_flight == 0:
                            break
                    if drain:
                        await asyncio.sleep(0.05)
                    continue
                for m in messages:
                    self.in_hand[m.id] = m
                self.waiting.extend(messages)
                self._start()
            await self._shutdown(grace)
        finally:
            stop.cancel()
            beat.cancel()
            self.ack_due.set()
            acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acker
            await self._flush_acks()
        return self.stats

    async def _process(self, m: Message) -> None:
        try:
            item = decode(m.payload)
            if self.is_async:
                result = await self.handler(item)
            else:
                result = await asyncio.to_thread(self.handler, item)
            if self.wq.results is not None:
                await self.wq.results.put(self.wq._result_key(m.id), encode(result))
            if self.then is not None:
                await self.then.enqueue(result, key=f"from:{self.wq.name}:{m.id}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.failed += 1
            error = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
            if self.on_failed is not None:
                self.on_failed(m, error)
            with contextlib.suppress(Exception):
                await self.wq.queue.nack(m, delay=self.wq.retry.delay(m.attempts), error=error)
            self._release(m)
            return
        self.acks.append(m)
        self.ack_due.set()
        self.stats.done += 1
        if self.on_done is not None:
            self.on_done(self.stats)
        self._release(m)

    def _start(self) -> None:
        """Run waiting items while fewer than `limit` run (none once stopping)."""
        while self.waiting and self.running < self.limit and not self.wq._stop.is_set():
            self.running += 1
            t = asyncio.create_task(self._process(self.waiting.popleft()))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def _release(self, m: Message) -> None:
        self.in_hand.pop(m.id, None)
        self.running -= 1
        self._start()
        self.freed.set()

    async def _on_stop(self) -> None:
        """On stop: wake the loop waiting for a slot, cancel a dequeue waiting for items."""
        await self.wq._stop.wait()
        self.freed.set()
        if self.fetch is not None:
            self.fetch.cancel()

    async def _acker(self) -> None:
        """Batch acks: one round trip for everything finished since the last one, and
        within ACK_LINGER after it, so that the items of the next fetches share it."""
        linger = min(ACK_LINGER, self.wq.visibility / 10)
        while True:
            await self.ack_due.wait()
            await self.wq.clock.sleep(linger)
            self.ack_due.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        if not self.acks:
            return
        batch, self.acks = self.acks, []
        try:
            await self.wq.queue.ack(batch)
        except asyncio.CancelledError:  # the acker stopped mid-flight: the last flush sends
            self.acks = batch + self.acks  # them again (acking twice is harmless)
            raise
        except Exception:
            self.acks = batch + self.acks  # the backend is away: try again later
            await self.wq.clock.sleep(0.2)
            self.ack_due.set()

    async def _heartbeat(self) -> None:
        """Extend the visibility of items in hand, every third of the visibility."""
        period = self.wq.visibility / 3
        while True:
            await self.wq.clock.sleep(period)
            for m in list(self.in_hand.values()):
                with contextlib.suppress(Exception):
                    await self.wq.queue.extend(m, self.wq.visibility)

    async def _shutdown(self, grace: float) -> None:
        while self.waiting:  # leased ahead, not started: give them back first
            m = self.waiting.popleft()
            self.in_hand.pop(m.id, None)
            with contextlib.suppress(Exception):
                await self.wq.queue.nack(m, error="returned unstarted at worker shutdown")
            self.stats.returned += 1
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for m in list(self.in_hand.values()):  # unfinished: give them back now
            with contextlib.suppress(Exception):
                await self.wq.queue.nack(m, error="returned unfinished at worker shutdown")
            self.stats.returned += 1
        self.in_hand.clear()


EFFECTS = "podkit/effects/"


async def apply_once(kv: KV, key: str, value: bytes = b"1") -> bool:
    """Record the effect of the item with idempotency `key` in `kv`, at most once.

    Delivery is at least once, so a handler may run again for an item whose effect
    already happened (it was killed before its ack). When the effect *is* this record
    (or is keyed by it downstream), the create-if-absent makes it exactly once: True when
    this call recorded it, False when an earlier delivery already had."""
    return await kv.create(f"{EFFECTS}{key}", value) is not None
