"""`redis://[user:pass@]host:port/db?prefix=P`: KV, Queue and Topic on Redis (rediss:// for TLS).

Every operation that changes state is one Lua script (EVALSHA through redis-py `Script`
objects), so it is atomic and one round trip. `prefix=` namespaces every key. Times are
the server's `TIME`, never the client clock. Options of every open: `prefix`, `timeout`
(seconds for the first answer; also `?timeout=`, default 5), `retries` (default 40).

- `connection`: the client, retried commands, replayed writes, the errors they raise;
- `kv`: `RedisKV` (`open_kv`);
- `queue`: `RedisQueue` (`open_queue`);
- `topic`: `RedisTopic` and its `RedisSubscription` (`open_topic`).

Not for Redis Cluster: scripts build key names inside their namespace.
"""

from __future__ import annotations

from podkit.backends.redis.connection import BLOCK_MAX, DEFAULT_PORT, REPLAY_TTL
from podkit.backends.redis.kv import HISTORY, RedisKV, open_kv
from podkit.backends.redis.queue import RedisQueue, open_queue
from podkit.backends.redis.topic import RedisSubscription, RedisTopic, open_topic

__all__ = [
    "BLOCK_MAX",
    "DEFAULT_PORT",
    "HISTORY",
    "REPLAY_TTL",
    "RedisKV",
    "RedisQueue",
    "RedisSubscription",
    "RedisTopic",
    "open_kv",
    "open_queue",
    "open_topic",
]
