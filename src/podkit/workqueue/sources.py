"""Sources: programs that feed a work queue. Each enqueues with an idempotency key, so a
source restarted after a crash does not enqueue what it already enqueued (within the
queue's dedupe window)."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from podkit.aio import wait_for
from podkit.backends import open_kv
from podkit.net.server import HTTPServer, Request, Response
from podkit.workqueue.core import WorkQueue

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


async def directory(
    wq: WorkQueue,
    path: str | Path,
    *,
    pattern: str = "*",
    poll: float = 1.0,
    settle: float = 0.5,
    stop: asyncio.Event | None = None,
    log: Log = _quiet,
) -> int:
    """Watch a directory; enqueue the path of every new or changed file matching `pattern`
    once its size has stopped changing for `settle` seconds. Returns how many it enqueued
    (when `stop` is set)."""
    root = Path(path)
    seen: dict[str, tuple[float, int]] = {}
    pending: dict[str, tuple[float, int, float]] = {}  # path -> (mtime, size, first seen)
    count = 0
    stop = stop or asyncio.Event()
    while not stop.is_set():
        now = time.monotonic()
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            entries = []
        batch: list[str] = []
        keys: list[str | None] = []
        for entry in entries:
            if not entry.is_file() or not fnmatch.fnmatch(entry.name, pattern):
                continue
            st = entry.stat()
            sig = (st.st_mtime, st.st_size)
            if seen.get(entry.path) == sig:
                continue
            first = pending.get(entry.path)
            if first is None or (first[0], first[1]) != sig:
                pending[entry.path] = (*sig, now)
                continue
            if now - first[2] < settle:
                continue
            pending.pop(entry.path)
            seen[entry.path] = sig
            batch.append(entry.path)
            keys.append(f"file:{entry.path}:{st.st_mtime_ns}:{st.st_size}")
        if batch:
            await wq.enqueue_many(batch, keys=keys)
            count += len(batch)
            log(f"enqueued {len(batch)} file(s) from {root}")
        try:
            await wait_for(stop.wait(), poll)
        except TimeoutError:
            pass
    return count


async def lines(wq: WorkQueue, file: str | Path, *, batch: int = 500, log: Log = _quiet) -> int:
    """Enqueue every non-empty line of a file (key: file and line number)."""
    count = 0
    items: list[str] = []
    keys: list[str | None] = []
    with open(file, encoding="utf-8") as f:  # noqa: ASYNC230 - read in bounded steps
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\n")
            if not text:
                continue
            items.append(text)
            keys.append(f"line:{file}:{number}")
            if len(items) >= batch:
                await wq.enqueue_many(items, keys=keys)
                count += len(items)
                items, keys = [], []
    if items:
        await wq.enqueue_many(items, keys=keys)
        count += len(items)
    log(f"enqueued {count} line(s) from {file}")
    return count


async def schedule(
    wq: WorkQueue,
    every: float,
    item: Any,
    *,
    stop: asyncio.Event | None = None,
    log: Log = _quiet,
) -> int:
    """Enqueue `item` every `every` seconds, aligned to the clock; the key is the tick, so
    two replicas of the source enqueue each tick once."""
    stop = stop or asyncio.Event()
    count = 0
    while not stop.is_set():
        now = time.time()
        tick = int(now // every)
        await wq.enqueue(item, key=f"tick:{every}:{tick}")
        count += 1
        log(f"tick {tick}")
        try:
            await wait_for(stop.wait(), (tick + 1) * every - now)
        except TimeoutError:
            pass
    return count


async def kv_prefix(
    wq: WorkQueue,
    url: str,
    prefix: str,
    *,
    stop: asyncio.Event | None = None,
    log: Log = _quiet,
) -> int:
    """Enqueue `{key, value}` for every put under `prefix` in a KV store (watched)."""
    kv = await open_kv(url)
    stop = stop or asyncio.Event()
    count = 0

    async def follow() -> None:
        nonlocal count
        async for ev in kv.watch(prefix, prefix=True):
            if ev.kind == "put" and ev.value is not None:
                item = {"key": ev.key, "value": ev.value.decode(errors="replace")}
                await wq.enqueue(item, key=f"kv:{ev.key}:{ev.revision}")
                count += 1
                log(f"enqueued {ev.key}")

    task = asyncio.create_task(follow())
    await stop.wait()
    task.cancel()
    await kv.close()
    return count


async def redis_list(
    wq: WorkQueue,
    url: str,
    key: str,
    *,
    stop: asyncio.Event | None = None,
    log: Log = _quiet,
) -> int:
    """Move items from a Redis list into the queue: BLMOVE to a processing list, enqueue,
    then drop them from it, so a crash in between loses nothing."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(url)
    processing = f"{key}:podkit-moving"
    stop = stop or asyncio.Event()
    count = 0
    while not stop.is_set():
        for leftover in await r.lrange(processing, 0, -1):  # moved before a crash
            await wq.enqueue(_str(leftover))
            await r.lrem(processing, 1, leftover)  # type: ignore[arg-type]  # bytes work
        raw = await r.blmove(key, processing, 1, "RIGHT", "LEFT")
        if raw is None:
            continue
        await wq.enqueue(_str(raw))
        await r.lrem(processing, 1, raw)  # type: ignore[arg-type]  # bytes work
        count += 1
    await r.aclose()
    log(f"moved {count} item(s) from {key}")
    return count


def _str(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class HTTPSource:
    """`POST /enqueue` with a JSON body (an item, or a list of items) adds them; an
    `Idempotency-Key` header dedupes a single item. Answers 202 with the ids. Bodies may
    be chunked; malformed requests get 400 (and 413 over 16 MiB), then the connection
    closes (`podkit.net.server`)."""

    def __init__(self, wq: WorkQueue, host: str = "127.0.0.1", port: int = 8090) -> None:
        self.wq = wq
        self._http = HTTPServer(self._handle, host, port, name="podkit queue source http")

    @property
    def host(self) -> str:
        return self._http.host

    @property
    def port(self) -> int:
        return self._http.port

    async def start(self) -> None:
        await self._http.start()

    async def _handle(self, req: Request) -> Response:
        status, body = await self._answer(req)
        return Response(status, json.dumps(body).encode())

    async def _answer(self, req: Request) -> tuple[int, Any]:
        if req.path != "/enqueue":
            return 404, {"error": "POST /enqueue"}
        if req.method != b"POST":
            return 405, {"error": "POST /enqueue"}
        try:
            item = json.loads(req.body)
        except ValueError as exc:
            return 400, {"error": f"body is not JSON: {exc}"}
        if isinstance(item, list):
            return 202, {"ids": await self.wq.enqueue_many(item)}
        key = req.header(b"idempotency-key")
        return 202, {"ids": [await self.wq.enqueue(item, key=_str(key) if key else None)]}

    async def close(self) -> None:
        await self._http.close()
