"""The topic in SQLite (`SQLiteTopic`, `SQLiteSubscription`, `open_topic`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from podkit.backends.base import Record, StartAt
from podkit.backends.prefixed import url_prefix
from podkit.backends.sqlite.database import POLL, _Database
from podkit.backends.url import BackendURL
from podkit.clock import Clock, WallClock


class SQLiteSubscription:
    """One member of a consumer group; the group's state lives in the file."""

    def __init__(
        self, db: _Database, topic: str, clock: Clock, group: str, ack_wait: float
    ) -> None:
        self.group = group
        self._db = db
        self._topic = topic
        self._clock = clock
        self._ack_wait = ack_wait

    def _deliver(self, max_items: int) -> list[Record]:
        conn = self._db.conn
        now = self._clock.now()
        key = {"t": self._topic, "g": self.group, "now": now}
        out = [
            Record(position, payload)
            for position, payload in conn.execute(
                "SELECT p.position, r.payload FROM t_pending p"
                " JOIN t_records r ON r.topic = p.topic AND r.position = p.position"
                " WHERE p.topic = :t AND p.grp = :g AND p.due <= :now"
                " ORDER BY p.position LIMIT :n",
                {**key, "n": max_items},
            )
        ]
        fresh = conn.execute(
            "SELECT position, payload FROM t_records WHERE topic = :t AND position >="
            " (SELECT next_position FROM t_groups WHERE topic = :t AND grp = :g)"
            " ORDER BY position LIMIT :n",
            {**key, "n": max_items - len(out)},
        ).fetchall()
        out += [Record(position, payload) for position, payload in fresh]
        conn.executemany(
            "INSERT OR REPLACE INTO t_pending (topic, grp, position, due) VALUES (?, ?, ?, ?)",
            [(self._topic, self.group, r.position, now + self._ack_wait) for r in out],
        )
        if fresh:
            conn.execute(
                "UPDATE t_groups SET next_position = ? WHERE topic = ? AND grp = ?",
                (fresh[-1][0] + 1, self._topic, self.group),
            )
        return out

    def _take(self, max_items: int) -> list[Record]:
        """Deliver due or new records, taking the write lock only when there are some."""
        (ready,) = self._db.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM t_pending WHERE topic = :t AND grp = :g AND due <= :now)"
            " OR EXISTS (SELECT 1 FROM t_records WHERE topic = :t AND position >="
            " (SELECT next_position FROM t_groups WHERE topic = :t AND grp = :g))",
            {"t": self._topic, "g": self.group, "now": self._clock.now()},
        ).fetchone()
        return self._db.transact(self._deliver, max_items) if ready else []

    def _ack(self, records: Sequence[Record]) -> None:
        self._db.conn.executemany(
            "DELETE FROM t_pending WHERE topic = ? AND grp = ? AND position = ?",
            [(self._topic, self.group, r.position) for r in records],
        )

    async def fetch(self, max_items: int = 100, *, wait: float = 1.0) -> list[Record]:
        deadline = self._clock.now() + wait
        while True:
            since = self._db.signal.version
            out = await self._db.run(self._take, max_items)
            left = deadline - self._clock.now()
            if out or left <= 0:
                return out
            await self._db.signal.wait(since, min(left, POLL))

    async def ack(self, records: Sequence[Record]) -> None:
        await self._db.write(self._ack, records)

    async def close(self) -> None:
        return None


class SQLiteTopic:
    """The SQLite topic: positions 1, 2, 3... per topic name; groups kept in the file."""

    def __init__(self, db: _Database, name: str, clock: Clock) -> None:
        self.url = db.url
        self.name = name
        self._db = db
        self._clock = clock

    def _head(self) -> int:
        """The last position (0 when empty)."""
        (head,) = self._db.conn.execute(
            "SELECT COALESCE(MAX(position), 0) FROM t_records WHERE topic = ?", (self.name,)
        ).fetchone()
        return int(head)

    def _publish(self, payloads: Sequence[bytes]) -> list[int]:
        conn = self._db.conn
        head = self._head()
        positions = list(range(head + 1, head + 1 + len(payloads)))
        conn.executemany(
            "INSERT INTO t_records (topic, position, payload) VALUES (?, ?, ?)",
            [
                (self.name, p, bytes(payload))
                for p, payload in zip(positions, payloads, strict=True)
            ],
        )
        return positions

    def _join(self, group: str, start: StartAt) -> None:
        conn = self._db.conn
        if start == "earliest":
            first = 1
        elif start == "latest":
            first = self._head() + 1
        else:
            first = max(1, int(start))
        conn.execute(
            "INSERT INTO t_groups (topic, grp, next_position) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (self.name, group, first),
        )

    def _read(self, start: int, limit: int) -> list[Record]:
        rows = self._db.conn.execute(
            "SELECT position, payload FROM t_records WHERE topic = ? AND position >= ?"
            " ORDER BY position LIMIT ?",
            (self.name, start, limit),
        )
        return [Record(position, payload) for position, payload in rows]

    async def publish(self, payload: bytes) -> int:
        (position,) = await self._db.write(self._publish, [payload])
        return position

    async def publish_batch(self, payloads: Sequence[bytes]) -> list[int]:
        return await self._db.write(self._publish, payloads)

    async def subscribe(
        self, group: str, *, start: StartAt = "earliest", ack_wait: float = 30.0
    ) -> SQLiteSubscription:
        await self._db.write(self._join, group, start)
        return SQLiteSubscription(self._db, self.name, self._clock, group, ack_wait)

    async def read(self, start: int, limit: int = 100) -> list[Record]:
        return await self._db.run(self._read, start, limit)

    async def close(self) -> None:
        await self._db.close()


async def open_topic(
    url: BackendURL, name: str, *, clock: Clock | None = None, **_: Any
) -> SQLiteTopic:
    name = url_prefix(url.query) + name
    return SQLiteTopic(await _Database.open(url, f"topic:{name}"), name, clock or WallClock())
