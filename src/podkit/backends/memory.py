"""`memory://NAME`: in-process KV, Queue and Topic, for tests and single-process programs.

Every open of the same URL in one process shares one store. Nothing is durable.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from podkit.aio import wait_for
from podkit.backends.base import (
    KV,
    Entry,
    Event,
    LeaseExpired,
    Message,
    QueueStats,
    Record,
    StaleReceipt,
    StartAt,
)
from podkit.backends.prefixed import PrefixedKV, url_prefix
from podkit.backends.url import BackendURL
from podkit.clock import Clock, SystemClock

HISTORY = 100_000  # watch events kept for resuming watches


class _Waiters:
    """Wake every waiting task, whatever loop it runs on (stores outlive test loops)."""

    def __init__(self) -> None:
        self._events: set[asyncio.Event] = set()

    def notify(self) -> None:
        for ev in self._events:
            ev.set()

    async def wait(self, timeout: float | None) -> None:
        ev = asyncio.Event()
        self._events.add(ev)
        try:
            await wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._events.discard(ev)


# ---------------------------------------------------------------------------- KV


class _KVStore:
    def __init__(self) -> None:
        self.revision = 0
        self.data: dict[str, Entry] = {}
        self.leases: dict[int, tuple[float, float]] = {}  # id -> (deadline, ttl)
        self.lease_keys: dict[int, set[str]] = {}
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self.lease_ids = itertools.count(1)
        self.waiters = _Waiters()


class MemoryKV:
    """The memory KV: one revision counter per store, leases on the injected clock."""

    def __init__(self, url: str, store: _KVStore, clock: Clock) -> None:
        self.url = url
        self._s = store
        self._clock = clock

    def _expire(self) -> None:
        now = self._clock.now()
        for lease, (deadline, _) in list(self._s.leases.items()):
            if deadline <= now:
                self._drop_lease(lease)

    def _drop_lease(self, lease: int) -> None:
        self._s.leases.pop(lease, None)
        for key in sorted(self._s.lease_keys.pop(lease, set())):
            entry = self._s.data.get(key)
            if entry is not None and entry.lease == lease:
                self._remove(key)

    def _record(self, event: Event) -> None:
        self._s.history.append(event)
        self._s.waiters.notify()

    def _write(self, key: str, value: bytes, lease: int | None) -> int:
        if lease is not None and lease not in self._s.leases:
            raise LeaseExpired(f"{self.url}: lease {lease} is not alive")
        s = self._s
        s.revision += 1
        old = s.data.get(key)
        if old is not None and old.lease is not None and old.lease != lease:
            s.lease_keys.get(old.lease, set()).discard(key)
        created = old.created if old is not None else s.revision
        s.data[key] = Entry(key, bytes(value), s.revision, created, lease)
        if lease is not None:
            s.lease_keys.setdefault(lease, set()).add(key)
        self._record(Event("put", key, bytes(value), s.revision))
        return s.revision

    def _remove(self, key: str) -> None:
        s = self._s
        old = s.data.pop(key)
        if old.lease is not None:
            s.lease_keys.get(old.lease, set()).discard(key)
        s.revision += 1
        self._record(Event("delete", key, None, s.revision))

    async def get(self, key: str) -> Entry | None:
        self._expire()
        return self._s.data.get(key)

    async def range(self, prefix: str) -> list[Entry]:
        self._expire()
        return [e for k, e in sorted(self._s.data.items()) if k.startswith(prefix)]

    async def revision(self) -> int:
        self._expire()
        return self._s.revision

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        self._expire()
        return self._write(key, value, lease)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int | None:
        self._expire()
        if key in self._s.data:
            return None
        return self._write(key, value, lease)

    async def update(
        self, key: str, value: bytes, *, revision: int, lease: int | None = None
    ) -> int | None:
        self._expire()
        old = self._s.data.get(key)
        if old is None or old.revision != revision:
            return None
        return self._write(key, value, lease)

    async def delete(self, key: str) -> bool:
        self._expire()
        if key not in self._s.data:
            return False
        self._remove(key)
        return True

    async def delete_if(self, key: str, *, revision: int) -> bool:
        self._expire()
        old = self._s.data.get(key)
        if old is None or old.revision != revision:
            return False
        self._remove(key)
        return True

    async def grant(self, ttl: float) -> int:
        self._expire()
        lease = next(self._s.lease_ids)
        self._s.leases[lease] = (self._clock.now() + ttl, ttl)
        return lease

    async def keep_alive(self, lease: int) -> bool:
        self._expire()
        if lease not in self._s.leases:
            return False
        _, ttl = self._s.leases[lease]
        self._s.leases[lease] = (self._clock.now() + ttl, ttl)
        return True

    async def revoke(self, lease: int) -> None:
        self._expire()
        self._drop_lease(lease)

    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncIterator[Event]:
        s = self._s
        self._expire()
        next_rev = s.revision + 1 if start_revision is None else start_revision
        while True:
            self._expire()
            for ev in list(s.history):
                if ev.revision < next_rev:
                    continue
                next_rev = ev.revision + 1
                if ev.key == key or (prefix and ev.key.startswith(key)):
                    yield ev
            if s.revision >= next_rev:
                continue  # changed while the consumer held an event: look again, not wait
            deadlines = [d for d, _ in s.leases.values()]
            timeout = max(0.0, min(deadlines) - self._clock.now()) + 0.001 if deadlines else 1.0
            await s.waiters.wait(min(timeout, 1.0))

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------- Queue


@dataclass
class _Item:
    id: str
    payload: bytes
    enqueued_at: float
    key: str | None
    visible_at: float
    attempts: int = 0
    receipt: str = ""
    last_error: str | None = None
    leased: bool = False


class _QueueStore:
    def __init__(self) -> None:
        self.items: dict[str, _Item] = {}
        self.heap: list[tuple[float, int, str, str]] = []  # visible_at, seq, id, receipt
        self.seq = itertools.count()
        self.keys: dict[str, tuple[str, float]] = {}  # idempotency key -> (id, expires)
        self.dead: dict[str, _Item] = {}
        self.waiters = _Waiters()


class MemoryQueue:
    """The memory queue: a heap ordered by visibility time, ids are UUIDs."""

    def __init__(
        self,
        url: str,
        name: str,
        store: _QueueStore,
        clock: Clock,
        max_attempts: int,
        dedupe_window: float,
    ) -> None:
        self.url = url
        self.name = name
        self.max_attempts = max_attempts
        self.dequeue_acks = True
        self.dedupe_window = dedupe_window
        self._s = store
        self._clock = clock

    def _schedule(self, item: _Item) -> None:
        heapq.heappush(self._s.heap, (item.visible_at, next(self._s.seq), item.id, item.receipt))
        self._s.waiters.notify()

    async def enqueue(self, payload: bytes, *, key: str | None = None, delay: float = 0) -> str:
        now = self._clock.now()
        if key is not None:
            known = self._s.keys.get(key)
            if known is not None and known[1] > now:
                return known[0]
        item = _Item(uuid.uuid4().hex, bytes(payload), now, key, now + delay)
        self._s.items[item.id] = item
        if key is not None:
            self._s.keys[key] = (item.id, now + self.dedupe_window)
        self._schedule(item)
        return item.id

    async def enqueue_batch(
        self, payloads: Sequence[bytes], *, keys: Sequence[str | None] | None = None
    ) -> list[str]:
        keys = keys or [None] * len(payloads)
        return [await self.enqueue(p, key=k) for p, k in zip(payloads, keys, strict=True)]

    def _take(self, max_items: int, visibility: float) -> list[Message]:
        now = self._clock.now()
        out: list[Message] = []
        heap = self._s.heap
        while heap and len(out) < max_items and heap[0][0] <= now:
            _, _, item_id, receipt = heapq.heappop(heap)
            item = self._s.items.get(item_id)
            if item is None or item.receipt != receipt or item.visible_at > now:
                continue  # acked, rescheduled or extended since
            if item.attempts >= self.max_attempts:
                self._kill(item, item.last_error or "visibility timeout expired")
                continue
            item.attempts += 1
            item.leased = True
            item.receipt = uuid.uuid4().hex
            item.visible_at = now + visibility
            heapq.heappush(heap, (item.visible_at, next(self._s.seq), item.id, item.receipt))
            out.append(self._message(item))
        return out

    def _message(self, item: _Item) -> Message:
        return Message(
            item.id, item.payload, item.attempts, item.receipt, item.enqueued_at, item.last_error
        )

    def _kill(self, item: _Item, error: str | None) -> None:
        self._s.items.pop(item.id, None)
        item.leased = False
        item.last_error = error
        self._s.dead[item.id] = item

    async def dequeue(
        self,
        max_items: int = 1,
        *,
        visibility: float = 30.0,
        wait: float = 0.0,
        ack: Sequence[Message] = (),
    ) -> list[Message]:
        if ack:
            await self.ack(ack)
        deadline = self._clock.now() + wait
        while True:
            out = self._take(max_items, visibility)
            left = deadline - self._clock.now()
            if out or left <= 0:
                return out
            nxt = self._s.heap[0][0] - self._clock.now() if self._s.heap else left
            await self._s.waiters.wait(max(0.001, min(left, nxt)))

    def _current(self, message: Message) -> _Item:
        item = self._s.items.get(message.id)
        if item is None or item.receipt != message.receipt:
            raise StaleReceipt(f"{self.url}: {message.id} was re-delivered or already done")
        return item

    async def ack(self, messages: Sequence[Message]) -> None:
        for m in messages:
            item = self._s.items.get(m.id)
            if item is not None and item.receipt == m.receipt:
                del self._s.items[m.id]

    async def nack(self, message: Message, *, delay: float = 0, error: str | None = None) -> None:
        item = self._current(message)
        item.last_error = error
        if item.attempts >= self.max_attempts:
            self._kill(item, error)
            return
        item.receipt = uuid.uuid4().hex
        item.leased = False
        item.visible_at = self._clock.now() + delay
        self._schedule(item)

    async def extend(self, message: Message, visibility: float) -> None:
        item = self._current(message)
        item.visible_at = self._clock.now() + visibility
        heapq.heappush(self._s.heap, (item.visible_at, next(self._s.seq), item.id, item.receipt))

    async def stats(self) -> QueueStats:
        now = self._clock.now()
        in_flight = sum(1 for i in self._s.items.values() if i.leased and i.visible_at > now)
        waiting = len(self._s.items) - in_flight
        return QueueStats(waiting, in_flight, len(self._s.dead))

    async def dead_letters(self, limit: int = 100) -> list[Message]:
        return [self._message(i) for i in itertools.islice(self._s.dead.values(), limit)]

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------- Topic


@dataclass
class _Group:
    next_position: int
    pending: dict[int, float] = field(default_factory=dict)  # position -> redeliver at


class _TopicStore:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.groups: dict[str, _Group] = {}
        self.waiters = _Waiters()


class MemorySubscription:
    def __init__(self, topic: MemoryTopic, group: str, ack_wait: float) -> None:
        self.group = group
        self._topic = topic
        self._ack_wait = ack_wait

    def _take(self, max_items: int) -> list[Record]:
        t = self._topic
        g = t._s.groups[self.group]
        now = t._clock.now()
        out: list[Record] = []
        for pos, due in sorted(g.pending.items()):
            if len(out) >= max_items:
                break
            if due <= now:
                g.pending[pos] = now + self._ack_wait
                out.append(t._s.records[pos - 1])
        records = t._s.records
        while len(out) < max_items and g.next_position <= len(records):
            rec = records[g.next_position - 1]
            g.pending[rec.position] = now + self._ack_wait
            g.next_position += 1
            out.append(rec)
        return out

    async def fetch(self, max_items: int = 100, *, wait: float = 1.0) -> list[Record]:
        deadline = self._topic._clock.now() + wait
        while True:
            out = self._take(max_items)
            left = deadline - self._topic._clock.now()
            if out or left <= 0:
                return out
            await self._topic._s.waiters.wait(min(left, 0.05))

    async def ack(self, records: Sequence[Record]) -> None:
        g = self._topic._s.groups[self.group]
        for r in records:
            g.pending.pop(r.position, None)

    async def close(self) -> None:
        return None


class MemoryTopic:
    def __init__(self, url: str, name: str, store: _TopicStore, clock: Clock) -> None:
        self.url = url
        self.name = name
        self._s = store
        self._clock = clock

    async def publish(self, payload: bytes) -> int:
        rec = Record(len(self._s.records) + 1, bytes(payload))
        self._s.records.append(rec)
        self._s.waiters.notify()
        return rec.position

    async def publish_batch(self, payloads: Sequence[bytes]) -> list[int]:
        return [await self.publish(p) for p in payloads]

    async def subscribe(
        self, group: str, *, start: StartAt = "earliest", ack_wait: float = 30.0
    ) -> MemorySubscription:
        if group not in self._s.groups:
            if start == "earliest":
                first = 1
            elif start == "latest":
                first = len(self._s.records) + 1
            else:
                first = max(1, int(start))
            self._s.groups[group] = _Group(first)
        return MemorySubscription(self, group, ack_wait)

    async def read(self, start: int, limit: int = 100) -> list[Record]:
        return self._s.records[max(0, start - 1) : max(0, start - 1) + limit]

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------- opening

_KV: dict[str, _KVStore] = {}
_QUEUES: dict[tuple[str, str], _QueueStore] = {}
_TOPICS: dict[tuple[str, str], _TopicStore] = {}


def _store_name(url: BackendURL) -> str:
    return (url.host + url.path) or "default"


async def open_kv(url: BackendURL, *, clock: Clock | None = None, **_: Any) -> KV:
    store = _KV.setdefault(_store_name(url), _KVStore())
    kv = MemoryKV(url.raw, store, clock or SystemClock())
    prefix = url_prefix(url.query)
    return PrefixedKV(kv, prefix, url.raw) if prefix else kv


async def open_queue(
    url: BackendURL,
    name: str,
    *,
    clock: Clock | None = None,
    max_attempts: int = 5,
    dedupe_window: float = 3600.0,
    **_: Any,
) -> MemoryQueue:
    name = url_prefix(url.query) + name
    store = _QUEUES.setdefault((_store_name(url), name), _QueueStore())
    return MemoryQueue(url.raw, name, store, clock or SystemClock(), max_attempts, dedupe_window)


async def open_topic(
    url: BackendURL, name: str, *, clock: Clock | None = None, **_: Any
) -> MemoryTopic:
    name = url_prefix(url.query) + name
    store = _TOPICS.setdefault((_store_name(url), name), _TopicStore())
    return MemoryTopic(url.raw, name, store, clock or SystemClock())
