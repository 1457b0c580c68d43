"""The SQLite file: its schema, a connection per open on a thread of its own, wake-ups.

Every open is its own connection, driven by its own worker thread so the event loop
never blocks. The file runs in WAL mode and every write is one `BEGIN IMMEDIATE`
transaction, so several processes can share it. Writers queue for the write lock on
`<file>-lock` (flock), which hands it to the next writer as soon as it is released;
SQLite's own busy wait sleeps a millisecond or more per try. Opens in one process wake
each other's waits at once; writes of other processes are seen by polling every `POLL`
seconds.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import queue
import sqlite3
import threading
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from podkit.backends.base import BackendError, UnsupportedURL
from podkit.backends.url import BackendURL

POLL = 0.025  # seconds between looks at the file while waiting (other processes' writes)
BUSY_TIMEOUT = 10.0  # seconds a transaction waits for another writer
CHECKPOINT_EVERY = 100  # commits of one open between its WAL checkpoints

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
