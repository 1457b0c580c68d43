"""`sqlite:///path`: KV, Queue and Topic in one SQLite file, shared by the processes of a host.

`sqlite:///relative/state.db` or `sqlite:////absolute/state.db`, as in SQLAlchemy.
Deadlines are wall-clock seconds.

- `database`: the file: its schema, one connection per open on a thread of its own, the
  write lock, wake-ups;
- `kv`: `SQLiteKV` (`open_kv`);
- `queue`: `SQLiteQueue` (`open_queue`);
- `topic`: `SQLiteTopic` and its `SQLiteSubscription` (`open_topic`).
"""

from __future__ import annotations

from podkit.backends.sqlite.database import (
    BUSY_TIMEOUT,
    CHECKPOINT_EVERY,
    POLL,
    SCHEMA,
    SCHEMA_VERSION,
)
from podkit.backends.sqlite.kv import HISTORY, WATCH_BATCH, SQLiteKV, open_kv
from podkit.backends.sqlite.queue import EXPIRED, SQLiteQueue, open_queue
from podkit.backends.sqlite.topic import SQLiteSubscription, SQLiteTopic, open_topic

__all__ = [
    "BUSY_TIMEOUT",
    "CHECKPOINT_EVERY",
    "EXPIRED",
    "HISTORY",
    "POLL",
    "SCHEMA",
    "SCHEMA_VERSION",
    "WATCH_BATCH",
    "SQLiteKV",
    "SQLiteQueue",
    "SQLiteSubscription",
    "SQLiteTopic",
    "open_kv",
    "open_queue",
    "open_topic",
]
