"""Shared state behind three Protocols (`KV`, `Queue`, `Topic`), opened by URL.

    kv = await open_kv("sqlite:///var/state.db")
    queue = await open_queue("redis://127.0.0.1:6379/0", name="jobs")
    topic = await open_topic("nats://127.0.0.1:4222", name="events")

Schemes: memory://, sqlite:///path, redis:// (rediss://), nats://, etcd:// (KV only).
"""

from __future__ import annotations

import importlib
from typing import Any

from podkit.backends.base import (
    KV,
    BackendError,
    BackendUnavailable,
    Entry,
    Event,
    LeaseExpired,
    Message,
    Queue,
    QueueStats,
    Record,
    StaleReceipt,
    Subscription,
    Topic,
    UnsupportedURL,
)
from podkit.backends.cas import cas_update
from podkit.backends.url import BackendURL, mask

# scheme -> (module, which Protocols it offers)
DRIVERS: dict[str, tuple[str, frozenset[str]]] = {
    "memory": ("podkit.backends.memory", frozenset({"kv", "queue", "topic"})),
    "sqlite": ("podkit.backends.sqlite", frozenset({"kv", "queue", "topic"})),
    "redis": ("podkit.backends.redis", frozenset({"kv", "queue", "topic"})),
    "rediss": ("podkit.backends.redis", frozenset({"kv", "queue", "topic"})),
    "nats": ("podkit.backends.nats", frozenset({"kv", "queue", "topic"})),
    "etcd": ("podkit.backends.etcd", frozenset({"kv"})),
}


def _driver(url: str, kind: str) -> tuple[Any, BackendURL]:
    parsed = BackendURL.parse(url)
    entry = DRIVERS.get(parsed.scheme)
    if entry is None:
        known = ", ".join(f"{s}://" for s in DRIVERS)
        raise UnsupportedURL(f"{parsed.masked}: unknown scheme '{parsed.scheme}' (known: {known})")
    module, kinds = entry
    if kind not in kinds:
        offer = [s for s, (_, k) in DRIVERS.items() if kind in k]
        raise UnsupportedURL(
            f"{parsed.masked}: {parsed.scheme}:// offers no {kind} "
            f"(use one of: {', '.join(f'{s}://' for s in offer)})"
        )
    try:
        return importlib.import_module(module), parsed
    except ImportError as exc:
        extra = {"rediss": "redis"}.get(parsed.scheme, parsed.scheme)
        raise UnsupportedURL(
            f"{parsed.masked}: the {parsed.scheme} driver needs an extra: "
            f"pip install 'podkit[{extra}]' ({exc})"
        ) from None


async def open_kv(url: str, **options: Any) -> KV:
    """Open a KV store by URL."""
    module, parsed = _driver(url, "kv")
    kv: KV = await module.open_kv(parsed, **options)
    return kv


async def open_queue(url: str, name: str = "default", **options: Any) -> Queue:
    """Open the queue `name` by URL (options: max_attempts, dedupe_window, ...)."""
    module, parsed = _driver(url, "queue")
    queue: Queue = await module.open_queue(parsed, name, **options)
    return queue


async def open_topic(url: str, name: str = "default", **options: Any) -> Topic:
    """Open the topic `name` by URL."""
    module, parsed = _driver(url, "topic")
    topic: Topic = await module.open_topic(parsed, name, **options)
    return topic


__all__ = [
    "DRIVERS",
    "KV",
    "BackendError",
    "BackendURL",
    "BackendUnavailable",
    "Entry",
    "Event",
    "LeaseExpired",
    "Message",
    "Queue",
    "QueueStats",
    "Record",
    "StaleReceipt",
    "Subscription",
    "Topic",
    "UnsupportedURL",
    "cas_update",
    "mask",
    "open_kv",
    "open_queue",
    "open_topic",
]
