"""`sqlite:///path`: KV, Queue and Topic in one SQLite file, shared by the processes of a host.

`sqlite:///relative/state.db` or `sqlite:////absolute/state.db`, as in SQLAlchemy. Every
open is its own connection, driven by its own worker thread so the event loop never blocks.
The file runs in WAL mode and every write is one `BEGIN IMMEDIATE` transaction, so several
processes can share it. Writers queue for the write lock on `<file>-lock` (flock), which
hands it to the next writer as soon as it is released; SQLite's own busy wait sleeps a
millisecond or more per try. Opens in one process wake each other's waits at once; writes
of other processes are seen by polling every `POLL` seconds. Deadlines are wall-clock seconds.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import queue
import sqlite3
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from podkit.backends.base import (
    KV,
    BackendError,
    Entry,
    Event,
    LeaseExpired,
    Message,
    QueueStats,
    Record,
    StaleReceipt,
    StartAt,
    UnsupportedURL,
)
from podkit.backends.prefixed import PrefixedKV, url_prefix
from podkit.backends.url import BackendURL
from podkit.clock import Clock, WallClock

POLL = 0.025  # seconds between looks at the file while waiting (other processes' writes)
BUSY_TIMEOUT = 10.0  # seconds a transaction waits for another writer
CHECKPOINT_EVERY = 100  # commits of one open between its WAL checkpoints
HISTORY = 100_000  # KV changes kept for resuming watches
WATCH_BATCH = 1000  # changes read per look
EXPIRED = "visibility timeout expired"

# ---------------------------------------------------------------------------- schema

SCHEMA_VERSION = 1
SCHEMA = (
    # KV: one revision counter for the file: the revision of its newest change.
    """CREATE TABLE kv_entries (
        key TEXT PRIMARY KEY, value BLOB NOT NULL, revision INTEGER NOT NULL,
        created INTEGER NOT NULL, lease INTEGER)""",
    "CREATE INDEX kv_entries_lease ON kv_entries (lease) WHERE lease IS NOT NULL",
    """CREATE TABLE kv_leases (
        id INTEGER PRIMARY KEY AUTOINCREMENT, deadline REAL NOT NULL, ttl REAL NOT NULL)""",
    "CREATE INDEX kv_leases_deadline ON kv_leases (deadline)",
    """CREATE TABLE kv_changes (
        revision INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL,
        value BLOB)""",
    # Queue: an item is ready (receipt NULL) or delivered (receipt set) and due again at
    # visible_at; dead letters move to q_dead.
    """CREATE TABLE q_items (
        seq INTEGER PRIMARY KEY, queue TEXT NOT NULL, id TEXT NOT NULL, payload BLOB NOT NULL,
        enqueued_at REAL NOT NULL, visible_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, receipt TEXT, last_error TEXT)""",
    "CREATE INDEX q_items_due ON q_items (queue, visible_at)",
    """CREATE TABLE q_dead (
        seq INTEGER PRIMARY KEY, queue TEXT NOT NULL, id TEXT NOT NULL, payload BLOB NOT NULL,
        enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL, last_error TEXT)""",
    "CREATE INDEX q_dead_queue ON q_dead (queue, seq)",
    """CREATE TABLE q_keys (
        queue TEXT NOT NULL, key TEXT NOT NULL, id TEXT NOT NULL, expires REAL NOT NULL,
        PRIMARY KEY (queue, key)) WITHOUT ROWID""",
    "CREATE INDEX q_keys_expires ON q_keys (queue, expires)",
    # Topic: records by position; each group's next position and its unacked positions.
    """CREATE TABLE t_records (
        topic TEXT NOT NULL, position INTEGER NOT NULL, payload BLOB NOT NULL,
        PRIMARY KEY (topic, position))""",
    """CREATE TABLE t_groups (
        topic TEXT NOT NULL, grp TEXT NOT NULL, next_position INTEGER NOT NULL,
        PRIMARY KEY (topic, grp)) WITHOUT ROWID""",
    """CREATE TABLE t_pending (
        topic TEXT NOT NULL, grp TEXT NOT NULL, position INTEGER NOT NULL, due REAL NOT NULL,
        PRIMARY KEY (topic, grp, position)) WITHOUT ROWID""",
)

# ---------------------------------------------------------------------------- plumbing

P = ParamSpec("P")
T = TypeVar("T")


class _Signal:
    """Wakes the waits of this process after a commit, from any thread and any loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @property
    def version(self) -> int:
        return self._version

    def notify(self) -> None:
        with self._lock:
            self._version += 1
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                pass

    async def wait(self, since: int, timeout: float) -> None:
        """Return after a notify later than version `since`, or after `timeout` seconds."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self._version != since:
                return
            self._waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter[1].wait()
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(waiter)


_SIGNALS: weakref.WeakValueDictionary[tuple[str, str], _Signal] = weakref.WeakValueDictionary()


def _signal(path: Path, channel: str) -> _Signal:
    key = (str(path), channel)
    signal = _SIGNALS.get(key)
    if signal is None:
        signal = _SIGNALS[key] = _Signal()
    return signal


def _file(url: BackendURL) -> Path:
    """The database path: url.path without its first slash, relative to the working dir."""
    if url.host or len(url.path) < 2:
        raise UnsupportedURL(
            f"{url.masked}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return Path(url.path[1:]).resolve()


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


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if not future.done():  # not cancelled meanwhile
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _Worker:
    """One thread that runs calls in order and hands each result to its caller's loop:
    a thread pool of one, without its per-call futures and locks."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="podkit-sqlite", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn = job
            try:
                ok, value = True, fn()
            except BaseException as exc:  # handed to the caller
                ok, value = False, exc
            try:
                loop.call_soon_threadsafe(_settle, future, ok, value)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass
            del job, future, value

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """`fn()` on the thread, after the calls before it; its result as a future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn))
        return future

    def stop(self) -> None:
        """End the thread after the calls already made."""
        self._jobs.put(None)


class _Database:
    """One connection to the file, used only by its own worker thread."""

    conn: sqlite3.Connection

    def __init__(self, url: BackendURL, path: Path, signal: _Signal) -> None:
        self.url = url.raw
        self.masked = url.masked
        self.path = path
        self.signal = signal
        self._worker = _Worker()
        self._closed = False
        self._lock = -1  # the fd of the writers' lock file; -1: none (SQLite's busy wait only)
        self._commits = 0  # since this open's last checkpoint

    @classmethod
    async def open(cls, url: BackendURL, channel: str) -> _Database:
        """Connect and create the schema if needed; `channel` scopes the in-process wakeups."""
        path = _file(url)
        db = cls(url, path, _signal(path, channel))
        try:
            await db.run(db._connect)
        except BaseException:
            db._worker.stop()
            raise
        return db

    def _connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(
                f"{self.masked}: cannot open the SQLite database {self.path}: {exc}"
            ) from None
        try:  # a lock file the writers queue on; without it SQLite's busy wait still works
            self._lock = os.open(f"{self.path}-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            self._lock = -1
        try:
            if self._lock >= 0:  # openers take turns: switching to WAL does not wait on busy
                fcntl.flock(self._lock, fcntl.LOCK_EX)
            try:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
                try:
                    self._prepare(conn)
                except BaseException:
                    conn.close()
                    raise
            finally:
                if self._lock >= 0:
                    fcntl.flock(self._lock, fcntl.LOCK_UN)
        except (OSError, sqlite3.Error) as exc:
            if self._lock >= 0:
                os.close(self._lock)
                self._lock = -1
            raise BackendError(
                f"{self.masked}: cannot open the SQLite database {self.path}: {exc}"
            ) from None
        self.conn = conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise BackendError(
                    f"{self.masked}: {self.path} cannot use WAL mode (journal mode is {mode})"
                )
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # see transact
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"{self.masked}: {self.path} has schema version {version}; this podkit "
                    f"knows up to {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call `fn` on the worker thread; SQLite errors become `BackendError`."""
        if self._closed:
            raise BackendError(f"{self.masked}: the store is closed")
        try:
            return await self._worker.call(partial(fn, *args, **kwargs))
        except sqlite3.Error as exc:
            raise BackendError(f"{self.masked}: SQLite failed on {self.path}: {exc}") from exc

    def transact(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """On the worker: `fn` in one write transaction, then wake this process's waits."""
        if self._lock >= 0:
            fcntl.flock(self._lock, fcntl.LOCK_EX)  # our turn among podkit's writers
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(*args, **kwargs)
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        finally:
            if self._lock >= 0:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
        self.signal.notify()
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY:  # outside the lock: other writers go on meanwhile
            self._commits = 0
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return result

    async def write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn` in one write transaction on the worker thread."""
        return await self.run(partial(self.transact, fn, *args, **kwargs))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._worker.call(self._disconnect)
        finally:
            self._worker.stop()

    def _disconnect(self) -> None:
        self.conn.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


# ---------------------------------------------------------------------------- KV


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


# ---------------------------------------------------------------------------- Queue


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


# ---------------------------------------------------------------------------- Topic


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


# ---------------------------------------------------------------------------- opening


async def open_kv(url: BackendURL, *, clock: Clock | None = None, **_: Any) -> KV:
    kv = SQLiteKV(await _Database.open(url, "kv"), clock or WallClock())
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
) -> SQLiteQueue:
    name = url_prefix(url.query) + name
    db = await _Database.open(url, f"queue:{name}")
    return SQLiteQueue(db, name, clock or WallClock(), max_attempts, dedupe_window)


async def open_topic(
    url: BackendURL, name: str, *, clock: Clock | None = None, **_: Any
) -> SQLiteTopic:
    name = url_prefix(url.query) + name
    return SQLiteTopic(await _Database.open(url, f"topic:{name}"), name, clock or WallClock())
