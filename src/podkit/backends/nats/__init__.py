"""`nats://[user:pass@]host:port[/store]?prefix=P`: KV, Queue and Topic on NATS JetStream.

Written for nats-server 2.9 (no per-message TTL, no batch get, no multi-subject writes).
Streams are named `<P>_<kind>_<name>` with subjects under `podkit.<P>.<kind>.<name>`
(`prefix` defaults to `podkit`; names keep [A-Za-z0-9] and escape other bytes as `-XX`).
Everything uses FILE storage, one replica.

- `wire`: names, headers, message formats, stream configurations (no IO);
- `connection`: the connection, its requests, pulls and feeds, stream and consumer setup;
- `kv`: `NatsKV` and its leases (`open_kv`);
- `queue`: `NatsQueue` (`open_queue`);
- `topic`: `NatsTopic` and its `NatsSubscription` (`open_topic`).
"""

from __future__ import annotations

from podkit.backends.nats.connection import CONNECT_TIMEOUT, DEFAULT_PORT, TIMEOUT
from podkit.backends.nats.kv import HISTORY, NatsKV, open_kv
from podkit.backends.nats.queue import ACK_WAIT, NatsQueue, open_queue
from podkit.backends.nats.topic import NatsSubscription, NatsTopic, open_topic

__all__ = [
    "ACK_WAIT",
    "CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "HISTORY",
    "TIMEOUT",
    "NatsKV",
    "NatsQueue",
    "NatsSubscription",
    "NatsTopic",
    "open_kv",
    "open_queue",
    "open_topic",
]
