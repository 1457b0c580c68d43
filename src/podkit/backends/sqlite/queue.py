"""The queue in SQLite (`SQLiteQueue`, `open_queue`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from podkit.backends.base import BackendError, Message, QueueStats, StaleReceipt
from podkit.backends.prefixed import url_prefix
from podkit.backends.sqlite.database import POLL, _Database, _file
from podkit.backends.url import BackendURL
from podkit.clock import Clock, WallClock

EXPIRED = "visibility timeout expired"


class SQLiteQueue:
    """The SQLite queue: items in visibility order; a receipt is `<row>.<random token>`.

    Methods starting with `_` run on the worker thread; writes inside one transaction."""

    def __init__(
        self, db: _Database, name: str, clock: Clock, max_attempts: int, dedupe_window: float
    ) -> None:
        self.url = db.url
        self.name = name
        self.max_attempts = max_attempts
        self.dequeue_acks = True
        self.dedupe_window = dedupe_window
        self._db = db
        self._clock = clock

    def _add(
        self, payloads: Sequence[bytes], keys: Sequence[str | None], delay: float
    ) -> list[str]:
        conn = self._db.conn
        now = self._clock.now()
        if any(key is not None for key in keys):
            conn.execute("DELETE FROM q_keys WHERE queue = ? AND expires <= ?", (self.name, now))
        known: dict[str, str] = {}
        new_ids = _tokens(len(payloads), 16)
        ids: list[str] = []
        items: list[tuple[str, str, bytes, float, float]] = []
        for payload, key in zip(payloads, keys, strict=True):
            if key is not None:
                if key not in known:
                    row = conn.execute(
                        "SELECT id FROM q_keys WHERE queue = ? AND key = ?", (self.name, key)
                    ).fetchone()
                    if row is not None:
                        known[key] = row[0]
                if key in known:
                    ids.append(known[key])
                    continue
            item_id = new_ids[len(items)]
            items.append((self.name, item_id, bytes(payload), now, now + delay))
            ids.append(item_id)
            if key is not None:
                known[key] = item_id
                conn.execute(
                    "INSERT INTO q_keys (queue, key, id, expires) VALUES (?, ?, ?, ?)",
                    (self.name, key, item_id, now + self.dedupe_window),
                )
        conn.executemany(
            "INSERT INTO q_items (queue, id, payload, enqueued_at, visible_at)"
            " VALUES (?, ?, ?, ?, ?)",
            items,
        )
        return ids

    def _kill(self, dead: list[tuple[str | None, int]]) -> None:
        """Move (last_error, row) items to the dead letters."""
        conn = self._db.conn
        conn.executemany(
            "INSERT INTO q_dead (queue, id, payload, enqueued_at, attempts, last_error)"
            " SELECT queue, id, payload, enqueued_at, attempts, ? FROM q_items WHERE seq = ?",
            dead,
        )
        conn.executemany("DELETE FROM q_items WHERE seq = ?", [(seq,) for _, seq in dead])

    def _deliver(self, max_items: int, visibility: float) -> list[Message]:
        now = self._clock.now()
        rows = self._db.conn.execute(
            "SELECT seq, id, payload, enqueued_at, attempts, last_error FROM q_items"
            " WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, seq",
            (self.name, now),
        )
        out: list[Message] = []
        taken: list[tuple[str, float, int]] = []
        dead: list[tuple[str | None, int]] = []
        while len(out) < max_items and (batch := rows.fetchmany(max_items - len(out))):
            tokens = _tokens(len(batch), 8)
            for seq, item_id, payload, enqueued_at, attempts, last_error in batch:
                if attempts >= self.max_attempts:  # its last delivery timed out
                    dead.append((last_error or EXPIRED, seq))
                    continue
                receipt = f"{seq}.{tokens.pop()}"
                taken.append((receipt, now + visibility, seq))
                out.append(
                    Message(item_id, payload, attempts + 1, receipt, enqueued_at, last_error)
                )
        rows.close()
        self._db.conn.executemany(
            "UPDATE q_items SET attempts = attempts + 1, receipt = ?, visible_at = ? WHERE seq = ?",
            taken,
        )
        if dead:
            self._kill(dead)
        return out

    def _take(self, max_items: int, visibility: float, ack: Sequence[Message]) -> list[Message]:
        """Ack `ack` and deliver due items; without acks, take the write lock only when an
        item is due."""
        if ack:
            return self._db.transact(self._ack_deliver, ack, max_items, visibility)
        if not self._db.conn.execute(
            "SELECT 1 FROM q_items WHERE queue = ? AND visible_at <= ? LIMIT 1",
            (self.name, self._clock.now()),
        ).fetchone():
            return []
        return self._db.transact(self._deliver, max_items, visibility)

    def _ack_deliver(
        self, ack: Sequence[Message], max_items: int, visibility: float
    ) -> list[Message]:
        self._ack(ack)
        return self._deliver(max_items, visibility)

    def _ack(self, messages: Sequence[Message]) -> None:
        done = [(seq, m.receipt, self.name) for m in messages if (seq := _seq(m)) is not None]
        self._db.conn.executemany(
            "DELETE FROM q_items WHERE seq = ? AND receipt = ? AND queue = ?", done
        )

    def _current(self, message: Message) -> tuple[int, int]:
        """The row and attempts of the delivery `message` names, or `StaleReceipt`."""
        seq = _seq(message)
        row = None
        if seq is not None:
            row = self._db.conn.execute(
                "SELECT attempts FROM q_items WHERE seq = ? AND receipt = ? AND queue = ?",
                (seq, message.receipt, self.name),
            ).fetchone()
        if seq is None or row is None:
            raise StaleReceipt(f"{self._db.masked}: {message.id} was re-delivered or already done")
        return seq, int(row[0])

    def _nack(self, message: Message, delay: float, error: str | None) -> None:
        seq, attempts = self._current(message)
        if attempts >= self.max_attempts:
            self._kill([(error, seq)])
            return
        self._db.conn.execute(
            "UPDATE q_items SET receipt = NULL, visible_at = ?, last_error = ? WHERE seq = ?",
            (self._clock.now() + delay, error, seq),
        )

    def _extend(self, message: Message, visibility: float) -> None:
        seq, _ = self._current(message)
        self._db.conn.execute(
            "UPDATE q_items SET visible_at = ? WHERE seq = ?",
            (self._clock.now() + visibility, seq),
        )

    def _stats(self) -> QueueStats:
        total, in_flight, dead = self._db.conn.execute(
            "SELECT (SELECT COUNT(*) FROM q_items WHERE queue = :q),"
            " (SELECT COUNT(*) FROM q_items"
            "  WHERE queue = :q AND receipt IS NOT NULL AND visible_at > :now),"
            " (SELECT COUNT(*) FROM q_dead WHERE queue = :q)",
            {"q": self.name, "now": self._clock.now()},
        ).fetchone()
        return QueueStats(total - in_flight, in_flight, dead)

    def _dead_letters(self, limit: int) -> list[Message]:
        rows = self._db.conn.execute(
            "SELECT id, payload, attempts, enqueued_at, last_error FROM q_dead"
            " WHERE queue = ? ORDER BY seq LIMIT ?",
            (self.name, limit),
        )
        return [Message(i, p, a, "", e, err) for i, p, a, e, err in rows]

    async def enqueue(self, payload: bytes, *, key: str | None = None, delay: float = 0) -> str:
        (item_id,) = await self._db.write(self._add, [payload], [key], delay)
        return item_id

    async def enqueue_batch(
        self, payloads: Sequence[bytes], *, keys: Sequence[str | None] | None = None
    ) -> list[str]:
        return await self._db.write(self._add, payloads, keys or [None] * len(payloads), 0.0)

    async def dequeue(
        self,
        max_items: int = 1,
        *,
        visibility: float = 30.0,
        wait: float = 0.0,
        ack: Sequence[Message] = (),
    ) -> list[Message]:
        deadline = self._clock.now() + wait
        while True:
            since = self._db.signal.version
            out = await self._db.run(self._take, max_items, visibility, ack)
            ack = ()
            left = deadline - self._clock.now()
            if out or left <= 0:
                return out
            await self._db.signal.wait(since, min(left, POLL))

    async def ack(self, messages: Sequence[Message]) -> None:
        await self._db.write(self._ack, messages)

    async def nack(self, message: Message, *, delay: float = 0, error: str | None = None) -> None:
        await self._db.write(self._nack, message, delay, error)

    async def extend(self, message: Message, visibility: float) -> None:
        await self._db.write(self._extend, message, visibility)

    async def stats(self) -> QueueStats:
        return await self._db.run(self._stats)

    async def dead_letters(self, limit: int = 100) -> list[Message]:
        return await self._db.run(self._dead_letters, limit)

    async def close(self) -> None:
        await self._db.close()


def _seq(message: Message) -> int | None:
    """The row a receipt names, or None if it is not one of ours."""
    row, dot, _ = message.receipt.partition(".")
    return int(row) if dot and row.isascii() and row.isdigit() else None


def _tokens(n: int, size: int) -> list[str]:
    """`n` random hex strings of `size` bytes, from one read of the OS random source."""
    raw = os.urandom(n * size).hex()
    return [raw[i : i + 2 * size] for i in range(0, len(raw), 2 * size)]


async def open_queue(
    url: BackendURL,
    name: str,
    *,
    clock: Clock | None = None,
    max_attempts: int = 5,
    dedupe_window: float = 3600.0,
    create: bool = True,
    **_: Any,
) -> SQLiteQueue:
    """Open queue `name`; with `create=False` a database file that is not there is a
    BackendError (a reader that must not make one: `podkit queue status`)."""
    name = url_prefix(url.query) + name
    if not create and not _file(url).exists():
        raise BackendError(f"{url.masked}: no SQLite database at {_file(url)}: no queue is there")
    db = await _Database.open(url, f"queue:{name}")
    return SQLiteQueue(db, name, clock or WallClock(), max_attempts, dedupe_window)
