"""The state substrate: `KV`, `Queue` and `Topic` Protocols, their records and errors.

Every driver (memory, SQLite, Redis, NATS JetStream, etcd) implements these and passes
the same contract test suite (tests/backends/).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


class BackendError(Exception):
    """A backend failed; the message names the (masked) URL and what went wrong."""


class BackendUnavailable(BackendError):
    """The server did not answer: names the URL, host:port and the timeout."""


class UnsupportedURL(BackendError):
    """An unknown scheme, or a URL a driver cannot use."""


class LeaseExpired(BackendError):
    """A write named a lease that has expired, been revoked, or never existed."""


class StaleReceipt(BackendError):
    """An ack/nack/extend for a delivery that is no longer current (it was re-delivered)."""


# ---------------------------------------------------------------------------- KV


@dataclass(frozen=True, slots=True)
class Entry:
    """One key's current value. `revision` is the store-wide revision of its last write
    (strictly increasing across the store, so usable as a fencing token); `created` is the
    revision that created the key; `lease` the lease it is attached to, if any."""

    key: str
    value: bytes
    revision: int
    created: int
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A change seen by a watch: a put (with the new value) or a delete, at `revision`."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes | None
    revision: int


@runtime_checkable
class KV(Protocol):
    """A key-value store with revisions, compare-and-swap, leases and watches."""

    url: str

    async def get(self, key: str) -> Entry | None:
        """The key's entry, or None when absent (or its lease expired)."""
        ...

    async def range(self, prefix: str) -> list[Entry]:
        """Every live entry whose key starts with `prefix`, sorted by key."""
        ...

    async def revision(self) -> int:
        """The store's revision now (0 before the first change). Read it before a
        `range`, then watch from it + 1: no change is missed between the two."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write unconditionally; return the new revision. A dead `lease` raises
        `LeaseExpired` (as in create and update)."""
        ...

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int | None:
        """Write only if the key is absent; the new revision, or None if it exists."""
        ...

    async def update(
        self, key: str, value: bytes, *, revision: int, lease: int | None = None
    ) -> int | None:
        """Write only if the key's revision is `revision`; the new revision, or None."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete; True if the key existed."""
        ...

    async def delete_if(self, key: str, *, revision: int) -> bool:
        """Delete only if the key's revision is `revision`; True if deleted."""
        ...

    async def grant(self, ttl: float) -> int:
        """A new lease of `ttl` seconds; keys put with it vanish when it expires."""
        ...

    async def keep_alive(self, lease: int) -> bool:
        """Renew the lease for another TTL; False if it already expired or is unknown."""
        ...

    async def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys."""
        ...

    def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncIterator[Event]:
        """Changes of `key` (or keys under it, with prefix=True) in revision order, from
        `start_revision` (inclusive) or from now; resumes by itself after a reconnect,
        without missing or repeating events."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------- Queue


@dataclass(frozen=True, slots=True)
class Message:
    """A queue item as delivered. `receipt` identifies this delivery: ack, nack and
    extend with a stale receipt (after a re-delivery) raise `StaleReceipt`."""

    id: str
    payload: bytes
    attempts: int
    receipt: str
    enqueued_at: float
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int  # ready or delayed, not yet delivered
    in_flight: int  # delivered, not yet acked (visibility running)
    dead: int  # dead-lettered


@runtime_checkable
class Queue(Protocol):
    """An at-least-once work queue with visibility timeouts and a dead-letter list."""

    url: str
    name: str
    max_attempts: int
    # True when `dequeue(ack=...)` takes no more round trips than `dequeue`: a worker then
    # sends its acks that way; otherwise it batches them in `ack` calls of their own.
    dequeue_acks: bool

    async def enqueue(self, payload: bytes, *, key: str | None = None, delay: float = 0) -> str:
        """Add an item; with `key`, an item with the same key already enqueued is not
        added again and its id is returned."""
        ...

    async def enqueue_batch(
        self, payloads: Sequence[bytes], *, keys: Sequence[str | None] | None = None
    ) -> list[str]:
        """Add many items in one round trip; ids in order."""
        ...

    async def dequeue(
        self,
        max_items: int = 1,
        *,
        visibility: float = 30.0,
        wait: float = 0.0,
        ack: Sequence[Message] = (),
    ) -> list[Message]:
        """Take up to `max_items`, hidden from others for `visibility` seconds; wait up to
        `wait` seconds for the first one. An item not acked in time is delivered again.
        `ack` is acked first (as by `ack`), in the same round trip where the driver can;
        if the call raises, they may or may not be acked (acking again is harmless)."""
        ...

    async def ack(self, messages: Sequence[Message]) -> None:
        """Done: remove them for good. A stale receipt is ignored: the item was delivered
        again and its current delivery stays."""
        ...

    async def nack(self, message: Message, *, delay: float = 0, error: str | None = None) -> None:
        """Failed: retry after `delay`, or dead-letter it after `max_attempts` deliveries,
        keeping `error`."""
        ...

    async def extend(self, message: Message, visibility: float) -> None:
        """Heartbeat: keep it hidden for `visibility` more seconds from now; raises
        `StaleReceipt` if it was delivered again meanwhile (as nack does)."""
        ...

    async def stats(self) -> QueueStats: ...

    async def dead_letters(self, limit: int = 100) -> list[Message]:
        """Dead-lettered items, oldest first, with their attempts and last error."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------- Topic


@dataclass(frozen=True, slots=True)
class Record:
    """A published message at `position` (strictly increasing within a topic)."""

    position: int
    payload: bytes


@runtime_checkable
class Subscription(Protocol):
    """One member of a consumer group. Unacked records return to the group after
    `ack_wait` seconds."""

    group: str

    async def fetch(self, max_items: int = 100, *, wait: float = 1.0) -> list[Record]: ...

    async def ack(self, records: Sequence[Record]) -> None: ...

    async def close(self) -> None: ...


StartAt = Literal["earliest", "latest"] | int


@runtime_checkable
class Topic(Protocol):
    """Publish/subscribe: every group sees every record; each record goes to one member
    of a group; groups keep durable positions."""

    url: str
    name: str

    async def publish(self, payload: bytes) -> int:
        """Append; return its position."""
        ...

    async def publish_batch(self, payloads: Sequence[bytes]) -> list[int]: ...

    async def subscribe(
        self, group: str, *, start: StartAt = "earliest", ack_wait: float = 30.0
    ) -> Subscription:
        """Join `group` (created at `start` if new: earliest, latest, or a position)."""
        ...

    async def read(self, start: int, limit: int = 100) -> list[Record]:
        """Replay: records at positions >= `start`, without a group."""
        ...

    async def close(self) -> None: ...
