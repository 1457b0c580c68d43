"""Backend throughput: podkit drivers beside the raw client on the same server, in one run.

    .venv/bin/python benchmarks/backends.py [--drivers memory,sqlite,redis,nats,etcd]

For each driver it measures
- KV compare-and-swap: `update(key, value, revision=...)` chained on one key (sequential)
  and on 16 keys by 16 tasks (concurrent); the raw reference does the same CAS with the
  bare client (a one-script EVALSHA on Redis, kv.update on NATS KV, a txn on etcd,
  an UPDATE ... WHERE revision on SQLite);
- Queue: enqueue_batch(100) + dequeue(100) + ack(100) until N items went through; the
  raw reference moves the same items with the bare client doing the least a reliable
  queue must (Redis: LPUSH a batch, RPOP count + ZADD the visibility deadlines, ZREM to
  ack; NATS: JetStream publish + pull fetch + ack; SQLite: executemany INSERT, then
  SELECT + DELETE, in transactions).
It starts its own servers on free ports (the binaries must be installed) and prints a
table with podkit/raw ratios. redis-benchmark runs too, for context.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from podkit.backends import open_kv, open_queue
from servers import EtcdServer, NatsServer, RedisServer

CONCURRENCY = 16
BATCH = 100
REDIS_BARE = 0.0  # LPUSH + RPOP only, items/s


async def timed(fn: Callable[[], Awaitable[int]]) -> float:
    """Run `fn` (which returns an operation count) and return operations per second."""
    start = time.perf_counter()
    n = await fn()
    return n / (time.perf_counter() - start)


# ------------------------------------------------------------------ podkit side


async def podkit_cas(url: str, n: int) -> tuple[float, float]:
    kv = await open_kv(url)

    async def chain(key: str, count: int) -> int:
        rev = await kv.put(key, b"0")
        for i in range(count):
            new = await kv.update(key, str(i).encode(), revision=rev)
            assert new is not None, "CAS lost without contention"
            rev = new
        return count

    seq = await timed(lambda: chain("bench/seq", n))

    async def many() -> int:
        per = n // CONCURRENCY
        await asyncio.gather(*(chain(f"bench/c{i}", per) for i in range(CONCURRENCY)))
        return per * CONCURRENCY

    conc = await timed(many)
    await kv.close()
    return seq, conc


async def podkit_queue(url: str, items: int) -> float:
    q = await open_queue(url, name="bench")
    payloads = [b"x" * 64] * BATCH

    async def run() -> int:
        done = 0
        while done < items:
            await q.enqueue_batch(payloads)
            got = await q.dequeue(BATCH, visibility=60)
            await q.ack(got)
            done += len(got)
        return done

    rate = await timed(run)
    await q.close()
    return rate


# ------------------------------------------------------------------ raw clients


async def raw_redis(url: str, n: int, items: int) -> tuple[float, float, float]:
    import redis.asyncio as aioredis

    r = aioredis.from_url(url)
    cas = r.register_script(
        "local v = redis.call('GET', KEYS[1]) "
        "if v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end return 0"
    )

    async def chain(key: str, count: int) -> int:
        await r.set(key, "0")
        prev = "0"
        for i in range(count):
            assert await cas(keys=[key], args=[prev, str(i)]) == 1
            prev = str(i)
        return count

    seq = await timed(lambda: chain("raw:seq", n))

    async def many() -> int:
        per = n // CONCURRENCY
        await asyncio.gather(*(chain(f"raw:c{i}", per) for i in range(CONCURRENCY)))
        return per * CONCURRENCY

    conc = await timed(many)

    async def queue() -> int:
        # the least a reliable queue does by hand: push a batch; pop it and record each
        # item's visibility deadline in a zset; ack by removing them (3 round trips)
        done = 0
        n = itertools.count()
        while done < items:
            await r.lpush("raw:q", *(f"{next(n)}:{'x' * 64}" for _ in range(BATCH)))
            got = await r.rpop("raw:q", BATCH) or []
            ids = [g.split(b":", 1)[0] for g in got]
            deadline = time.time() + 60
            await r.zadd("raw:inflight", dict.fromkeys(ids, deadline))
            await r.zrem("raw:inflight", *ids)
            done += len(got)
        return done

    q = await timed(queue)

    async def bare() -> int:
        # a lower bound no queue reaches: push and pop, no visibility, no ack
        done = 0
        while done < items:
            await r.lpush("raw:b", *([b"x" * 64] * BATCH))
            done += len(await r.rpop("raw:b", BATCH) or [])
        return done

    global REDIS_BARE
    REDIS_BARE = await timed(bare)
    await r.aclose()
    return seq, conc, q


async def raw_nats(url: str, n: int, items: int) -> tuple[float, float, float]:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    kv = await js.create_key_value(bucket="rawbench", history=1)

    async def chain(key: str, count: int) -> int:
        rev = await kv.put(key, b"0")
        for i in range(count):
            rev = await kv.update(key, str(i).encode(), last=rev)
        return count

    seq = await timed(lambda: chain("seq", n))

    async def many() -> int:
        per = n // CONCURRENCY
        await asyncio.gather(*(chain(f"c{i}", per) for i in range(CONCURRENCY)))
        return per * CONCURRENCY

    conc = await timed(many)
    await js.add_stream(name="rawq", subjects=["rawq"], retention="workqueue")
    sub = await js.pull_subscribe("rawq", durable="rawq")

    async def queue() -> int:
        done = 0
        while done < items:
            acks = [await js.publish_async("rawq", b"x" * 64) for _ in range(BATCH)]  # type: ignore[attr-defined]
            await asyncio.gather(*acks)
            msgs = await sub.fetch(BATCH, timeout=5)
            await asyncio.gather(*(m.ack() for m in msgs))
            done += len(msgs)
        return done

    try:
        q = await timed(queue)
    except AttributeError:  # older nats-py without publish_async

        async def queue_sync() -> int:
            done = 0
            while done < items:
                await asyncio.gather(*(js.publish("rawq", b"x" * 64) for _ in range(BATCH)))
                msgs = await sub.fetch(BATCH, timeout=5)
                await asyncio.gather(*(m.ack() for m in msgs))
                done += len(msgs)
            return done

        q = await timed(queue_sync)
    await nc.close()
    return seq, conc, q


async def raw_etcd(http_url: str, n: int) -> tuple[float, float]:
    import aiohttp

    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    async with aiohttp.ClientSession() as session:

        async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            async with session.post(http_url + path, json=body) as resp:
                data: dict[str, Any] = await resp.json(content_type=None)
                return data

        async def chain(key: str, count: int) -> int:
            put = await post("/v3/kv/put", {"key": b64(key), "value": b64("0")})
            rev = int(put["header"]["revision"])
            for i in range(count):
                txn = await post(
                    "/v3/kv/txn",
                    {
                        "compare": [
                            {
                                "key": b64(key),
                                "target": "MOD",
                                "result": "EQUAL",
                                "mod_revision": str(rev),
                            }
                        ],
                        "success": [{"request_put": {"key": b64(key), "value": b64(str(i))}}],
                    },
                )
                assert txn.get("succeeded"), txn
                rev = int(txn["header"]["revision"])
            return count

        seq = await timed(lambda: chain("raw/seq", n))

        async def many() -> int:
            per = n // CONCURRENCY
            await asyncio.gather(*(chain(f"raw/c{i}", per) for i in range(CONCURRENCY)))
            return per * CONCURRENCY

        conc = await timed(many)
    return seq, conc


def raw_sqlite(path: Path, n: int, items: int) -> tuple[float, float]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB, rev INTEGER)")
    db.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, payload BLOB)")
    db.execute("INSERT INTO kv VALUES ('seq', x'30', 1)")
    start = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        cur = db.execute(
            "UPDATE kv SET value = ?, rev = rev + 1 WHERE key = 'seq' AND rev = ?",
            (str(i).encode(), i + 1),
        )
        assert cur.rowcount == 1
        db.execute("COMMIT")
    cas = n / (time.perf_counter() - start)
    start = time.perf_counter()
    done = 0
    while done < items:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO q (payload) VALUES (?)", [(b"x" * 64,)] * BATCH)
        db.execute("COMMIT")
        db.execute("BEGIN IMMEDIATE")
        ids = [r[0] for r in db.execute("SELECT id FROM q ORDER BY id LIMIT ?", (BATCH,))]
        db.executemany("DELETE FROM q WHERE id = ?", [(i,) for i in ids])
        db.execute("COMMIT")
        done += len(ids)
    q = done / (time.perf_counter() - start)
    db.close()
    return cas, q


def redis_benchmark(port: int) -> str:
    try:
        out = subprocess.run(
            ["redis-benchmark", "-p", str(port), "-n", "50000", "-q", "-t", "set,lpush,rpop"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"redis-benchmark unavailable: {exc}"
    lines = [ln.strip().split("\r")[-1] for ln in out.splitlines() if "requests per second" in ln]
    return "; ".join(lines)


# ------------------------------------------------------------------ main


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def fmt(x: float | None) -> str:
    return f"{x:,.0f}" if x else "-"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--drivers", default="memory,sqlite,redis,nats,etcd")
    ap.add_argument("--cas", type=int, default=2000, help="CAS operations per measurement")
    ap.add_argument("--items", type=int, default=20000, help="queue items per measurement")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()
    drivers = args.drivers.split(",")
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="podkit-bench-"))
    context = ""
    for driver in drivers:
        row: dict[str, Any] = {"driver": driver}
        if driver == "memory":
            row["cas"], row["cas16"] = await podkit_cas("memory://bench", args.cas)
            row["queue"] = await podkit_queue("memory://bench", args.items)
        elif driver == "sqlite":
            url = f"sqlite:///{tmp / 'podkit.db'}"
            row["cas"], row["cas16"] = await podkit_cas(url, args.cas)
            row["queue"] = await podkit_queue(url, args.items)
            row["raw_cas"], row["raw_queue"] = raw_sqlite(tmp / "raw.db", args.cas, args.items)
        elif driver == "redis":
            with RedisServer() as server:
                row["cas"], row["cas16"] = await podkit_cas(server.url, args.cas)
                row["queue"] = await podkit_queue(server.url, args.items)
                row["raw_cas"], row["raw_cas16"], row["raw_queue"] = await raw_redis(
                    server.url, args.cas, args.items
                )
                context = redis_benchmark(server.port)
        elif driver == "nats":
            with NatsServer() as server:
                row["cas"], row["cas16"] = await podkit_cas(server.url, args.cas)
                row["queue"] = await podkit_queue(server.url, args.items)
                row["raw_cas"], row["raw_cas16"], row["raw_queue"] = await raw_nats(
                    server.url, args.cas, args.items
                )
        elif driver == "etcd":
            with EtcdServer() as server:
                row["cas"], row["cas16"] = await podkit_cas(server.url, args.cas)
                row["raw_cas"], row["raw_cas16"] = await raw_etcd(server.http_url, args.cas)
        rows.append(row)
        print(f"{driver}: done", file=sys.stderr, flush=True)
    head = (
        f"{'driver':8} {'CAS/s':>9} {'raw':>9} {'ratio':>6} | {'CAS/s x16':>9} {'raw':>9} "
        f"{'ratio':>6} | {'queue items/s':>13} {'raw':>9} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['driver']:8} {fmt(r.get('cas')):>9} {fmt(r.get('raw_cas')):>9} "
            f"{ratio(r.get('cas'), r.get('raw_cas')):>6} | {fmt(r.get('cas16')):>9} "
            f"{fmt(r.get('raw_cas16')):>9} {ratio(r.get('cas16'), r.get('raw_cas16')):>6} | "
            f"{fmt(r.get('queue')):>13} {fmt(r.get('raw_queue')):>9} "
            f"{ratio(r.get('queue'), r.get('raw_queue')):>6}"
        )
    if REDIS_BARE:
        podkit_redis = next(r.get("queue") for r in rows if r["driver"] == "redis")
        print(
            f"\nredis bare LPUSH+RPOP (no visibility, no ack): {fmt(REDIS_BARE)} items/s; "
            f"podkit is {ratio(podkit_redis, REDIS_BARE)} of it"
        )
    if context:
        print(f"redis-benchmark on the same server: {context}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
