"""The KV in SQLite (`SQLiteKV`, `open_kv`)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from typing import Any

from podkit.backends.base import KV, BackendError, Entry, Event, LeaseExpired
from podkit.backends.prefixed import PrefixedKV, url_prefix
from podkit.backends.sqlite.database import POLL, _Database
from podkit.backends.url import BackendURL
from podkit.clock import Clock, WallClock

HISTORY = 100_000  # KV changes kept for resuming watches
WATCH_BATCH = 1000  # changes read per look


def _prefix_end(prefix: str) -> str | None:
    """The least key above every key starting with `prefix` (None: no bound)."""
    stem = prefix.rstrip("\U0010ffff")
    if not stem:
        return None
    nxt = ord(stem[-1]) + 1
    return stem[:-1] + chr(0xE000 if nxt == 0xD800 else nxt)  # skip the surrogates


def _rowid(cursor: sqlite3.Cursor) -> int:
    """The rowid the INSERT on `cursor` made."""
    assert cursor.lastrowid is not None
    return cursor.lastrowid


class SQLiteKV:
    """The SQLite KV: one revision counter per file, leases on the injected clock.

    Methods starting with `_` run on the worker thread; writes inside one transaction."""

    def __init__(self, db: _Database, clock: Clock) -> None:
        self.url = db.url
        self._db = db
        self._clock = clock

    def _expire(self) -> None:
        due = self._db.conn.execute(
            "SELECT id FROM kv_leases WHERE deadline <= ? ORDER BY id", (self._clock.now(),)
        ).fetchall()
        for (lease,) in due:
            self._drop_lease(lease)

    def _expire_now(self) -> None:
        """Expire due leases, taking the write lock only when one is due."""
        (first,) = self._db.conn.execute("SELECT MIN(deadline) FROM kv_leases").fetchone()
        if first is not None and first <= self._clock.now():
            self._db.transact(self._expire)

    def _drop_lease(self, lease: int) -> None:
        keys = self._db.conn.execute(
            "SELECT key FROM kv_entries WHERE lease = ? ORDER BY key", (lease,)
        ).fetchall()
        for (key,) in keys:
            self._remove(key)
        self._db.conn.execute("DELETE FROM kv_leases WHERE id = ?", (lease,))

    def _log(self, kind: str, key: str, value: bytes | None) -> int:
        """Record a change; its rowid is the new revision. Prunes the oldest history."""
        conn = self._db.conn
        revision = _rowid(
            conn.execute(
                "INSERT INTO kv_changes (kind, key, value) VALUES (?, ?, ?)", (kind, key, value)
            )
        )
        conn.execute("DELETE FROM kv_changes WHERE revision <= ?", (revision - HISTORY,))
        return revision

    def _write(self, key: str, value: bytes, lease: int | None) -> int:
        conn = self._db.conn
        if (
            lease is not None
            and not conn.execute("SELECT 1 FROM kv_leases WHERE id = ?", (lease,)).fetchone()
        ):
            raise LeaseExpired(f"{self._db.masked}: lease {lease} is not alive")
        revision = self._log("put", key, value)
        conn.execute(
            "INSERT INTO kv_entries (key, value, revision, created, lease) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET"
            " value = excluded.value, revision = excluded.revision, lease = excluded.lease",
            (key, value, revision, revision, lease),
        )
        return revision

    def _remove(self, key: str) -> None:
        self._log("delete", key, None)
        self._db.conn.execute("DELETE FROM kv_entries WHERE key = ?", (key,))

    def _revision(self, key: str) -> int | None:
        row = self._db.conn.execute(
            "SELECT revision FROM kv_entries WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _get(self, key: str) -> Entry | None:
        self._expire_now()
        row = self._db.conn.execute(
            "SELECT key, value, revision, created, lease FROM kv_entries WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else Entry(*row)

    def _range(self, prefix: str) -> list[Entry]:
        self._expire_now()
        end = _prefix_end(prefix)
        sql = "SELECT key, value, revision, created, lease FROM kv_entries WHERE key >= ?"
        if end is None:
            rows = self._db.conn.execute(sql + " ORDER BY key", (prefix,))
        else:
            rows = self._db.conn.execute(sql + " AND key < ? ORDER BY key", (prefix, end))
        return [Entry(*row) for row in rows]

    def _put(self, key: str, value: bytes, lease: int | None) -> int:
        self._expire()
        return self._write(key, value, lease)

    def _create(self, key: str, value: bytes, lease: int | None) -> int | None:
        self._expire()
        if self._revision(key) is not None:
            return None
        return self._write(key, value, lease)

    def _update(self, key: str, value: bytes, revision: int, lease: int | None) -> int | None:
        self._expire()
        if self._revision(key) != revision:
            return None
        return self._write(key, value, lease)

    def _delete_if(self, key: str, revision: int | None) -> bool:
        self._expire()
        current = self._revision(key)
        if current is None or (revision is not None and current != revision):
            return False
        self._remove(key)
        return True

    def _grant(self, ttl: float) -> int:
        self._expire()
        return _rowid(
            self._db.conn.execute(
                "INSERT INTO kv_leases (deadline, ttl) VALUES (?, ?)",
                (self._clock.now() + ttl, ttl),
            )
        )

    def _keep_alive(self, lease: int) -> bool:
        self._expire()
        cursor = self._db.conn.execute(
            "UPDATE kv_leases SET deadline = ? + ttl WHERE id = ?", (self._clock.now(), lease)
        )
        return cursor.rowcount > 0

    def _revoke(self, lease: int) -> None:
        self._expire()
        self._drop_lease(lease)

    def _changes(
        self, key: str, prefix: bool, next_revision: int | None
    ) -> tuple[list[Event], int]:
        """Matching changes from `next_revision` (None: from now) and the revision after
        the last one looked at."""
        self._expire_now()
        conn = self._db.conn
        conn.execute("BEGIN")  # one snapshot
        try:
            oldest, head = conn.execute(
                "SELECT (SELECT MIN(revision) FROM kv_changes),"
                " (SELECT MAX(revision) FROM kv_changes)"
            ).fetchone()
            head = head or 0
            if next_revision is None:
                return [], head + 1
            if oldest is not None and oldest > 1 and next_revision < oldest:
                raise BackendError(
                    f"{self._db.masked}: revision {next_revision} is no longer kept "
                    f"(the oldest kept is {oldest})"
                )
            sql = (
                "SELECT revision, kind, key, value FROM kv_changes"
                " WHERE revision >= ? AND revision <= ? AND "
            )
            end = _prefix_end(key) if prefix else None
            if not prefix:
                match: tuple[str, ...] = ("key = ?", key)
            elif end is None:
                match = ("key >= ?", key)
            else:
                match = ("key >= ? AND key < ?", key, end)
            rows = conn.execute(
                sql + match[0] + " ORDER BY revision LIMIT ?",
                (next_revision, head, *match[1:], WATCH_BATCH),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        events = [Event(kind, k, value, revision) for revision, kind, k, value in rows]
        seen = events[-1].revision if len(events) == WATCH_BATCH else head
        return events, max(next_revision, seen + 1)

    async def get(self, key: str) -> Entry | None:
        return await self._db.run(self._get, key)

    async def range(self, prefix: str) -> list[Entry]:
        return await self._db.run(self._range, prefix)

    async def revision(self) -> int:
        return (await self._db.run(self._changes, "", False, None))[1] - 1

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return await self._db.write(self._put, key, bytes(value), lease)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int | None:
        return await self._db.write(self._create, key, bytes(value), lease)

    async def update(
        self, key: str, value: bytes, *, revision: int, lease: int | None = None
    ) -> int | None:
        return await self._db.write(self._update, key, bytes(value), revision, lease)

    async def delete(self, key: str) -> bool:
        return await self._db.write(self._delete_if, key, None)

    async def delete_if(self, key: str, *, revision: int) -> bool:
        return await self._db.write(self._delete_if, key, revision)

    async def grant(self, ttl: float) -> int:
        return await self._db.write(self._grant, ttl)

    async def keep_alive(self, lease: int) -> bool:
        return await self._db.write(self._keep_alive, lease)

    async def revoke(self, lease: int) -> None:
        await self._db.write(self._revoke, lease)

    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncIterator[Event]:
        next_revision = start_revision
        while True:
            since = self._db.signal.version
            events, next_revision = await self._db.run(self._changes, key, prefix, next_revision)
            for event in events:
                yield event
            if not events:
                await self._db.signal.wait(since, POLL)

    async def close(self) -> None:
        await self._db.close()


async def open_kv(url: BackendURL, *, clock: Clock | None = None, **_: Any) -> KV:
    kv = SQLiteKV(await _Database.open(url, "kv"), clock or WallClock())
    prefix = url_prefix(url.query)
    return PrefixedKV(kv, prefix, url.raw) if prefix else kv
