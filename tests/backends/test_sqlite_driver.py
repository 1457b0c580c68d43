"""SQLite-specific behaviour: several processes on one file, durability, paths and errors."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from podkit.backends import BackendError, UnsupportedURL, open_kv, open_queue, open_topic
from podkit.backends import sqlite as driver

WORKER = """
import asyncio, json, os, sys, time
from podkit.backends import open_queue

async def main(url: str, go: str, tag: str, count: int) -> None:
    while not os.path.exists(go):
        time.sleep(0.005)
    queue = await open_queue(url, "shared")
    acked, attempts, sent = [], [], 0
    while True:
        if sent < count:
            batch = [f"{tag}-{i}".encode() for i in range(sent, min(sent + 20, count))]
            await queue.enqueue_batch(batch)
            sent += len(batch)
        got = await queue.dequeue(7, visibility=60, wait=0 if sent < count else 0.5)
        if got:
            await queue.ack(got)
            acked += [m.payload.decode() for m in got]
            attempts += [m.attempts for m in got]
        elif sent == count:
            break
    await queue.close()
    print(json.dumps({"acked": acked, "attempts": attempts}))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def test_two_processes_share_a_queue_without_loss_or_duplicates(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared' / 'state.db'}"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(go), tag, "400"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    time.sleep(0.2)
    go.touch()  # both open the fresh file at once, then produce and consume together
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    acked = [p for r in results for p in r["acked"]]
    assert sorted(acked) == sorted(f"{t}-{i}" for t in "ab" for i in range(400))
    assert all(a == 1 for r in results for a in r["attempts"]), "an item was delivered twice"
    assert all(r["acked"] for r in results), "one process consumed nothing"


async def test_data_survives_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    kv = await open_kv(url)
    rev = await kv.put("cfg", b"v1")
    await kv.close()
    queue = await open_queue(url, "jobs")
    await queue.enqueue_batch([b"1", b"2", b"3"])
    (taken,) = await queue.dequeue(visibility=60)
    await queue.close()
    topic = await open_topic(url, "events")
    await topic.publish_batch([b"e1", b"e2"])
    await topic.close()

    kv = await open_kv(url)
    entry = await kv.get("cfg")
    assert entry is not None and (entry.value, entry.revision) == (b"v1", rev)
    assert await kv.put("cfg", b"v2") > rev
    await kv.close()
    queue = await open_queue(url, "jobs")
    stats = await queue.stats()
    assert (stats.depth, stats.in_flight) == (2, 1)
    await queue.ack([taken])  # the delivery made before the reopen is still current
    assert sorted(m.payload for m in await queue.dequeue(10)) == [b"2", b"3"]
    await queue.close()
    topic = await open_topic(url, "events")
    assert [(r.position, r.payload) for r in await topic.read(1)] == [(1, b"e1"), (2, b"e2")]
    assert await topic.publish(b"e3") == 3
    await topic.close()


async def test_relative_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = await open_kv("sqlite:///rel/dir/state.db")
    await rel.put("k", b"relative")
    await rel.close()
    absolute = await open_kv(f"sqlite:///{tmp_path / 'rel' / 'dir' / 'state.db'}")
    got = await absolute.get("k")
    assert got is not None and got.value == b"relative"
    await absolute.close()
    with sqlite3.connect(tmp_path / "rel" / "dir" / "state.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_bad_paths_give_clear_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database" * 100)
    for path in (blocker / "state.db", garbage, tmp_path):
        url = f"sqlite:///{path}"
        with pytest.raises(BackendError) as err:
            await open_queue(url)
        assert url in str(err.value) and "cannot open" in str(err.value)
    with pytest.raises(UnsupportedURL, match=r"expected sqlite:///relative/path\.db"):
        await open_kv("sqlite://state.db")


async def test_separate_opens_wake_each_other(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    consumer = await open_queue(url, "jobs")
    producer = await open_queue(url, "jobs")
    watcher = await open_kv(url)
    writer = await open_kv(url)

    async def later() -> float:
        await asyncio.sleep(0.3)
        await writer.put("cfg", b"new")
        await producer.enqueue(b"job")
        return time.monotonic()

    async def first_event() -> float:
        async for _ in watcher.watch("cfg"):
            return time.monotonic()
        raise AssertionError("the watch ended")

    task = asyncio.create_task(later())
    watched = asyncio.create_task(first_event())
    got = await consumer.dequeue(wait=5)
    woke = time.monotonic()
    sent = await task
    assert [m.payload for m in got] == [b"job"]
    assert woke - sent < 0.2
    assert await asyncio.wait_for(watched, 5) - sent < 0.2
    for store in (consumer, producer, watcher, writer):
        await store.close()


async def test_watch_sees_another_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    kv = await open_kv(url)
    lease = await kv.grant(30)
    code = (
        "import asyncio, sys\n"
        "from podkit.backends import open_kv\n"
        "async def main():\n"
        "    kv = await open_kv(sys.argv[1])\n"
        "    assert await kv.keep_alive(int(sys.argv[2]))\n"
        "    await kv.put('from/child', b'hello', lease=int(sys.argv[2]))\n"
        "    await kv.close()\n"
        "asyncio.run(main())\n"
    )
    events = kv.watch("from/", prefix=True)
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.1)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, url, str(lease))
    assert await proc.wait() == 0
    event = await asyncio.wait_for(first, 5)
    assert (event.kind, event.key, event.value) == ("put", "from/child", b"hello")
    await kv.revoke(lease)
    gone = await asyncio.wait_for(anext(events), 5)
    assert (gone.kind, gone.key, gone.revision) == ("delete", "from/child", event.revision + 1)
    await kv.close()


async def test_watch_from_a_pruned_revision_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(driver.kv, "HISTORY", 5)  # the KV module reads it
    kv = await open_kv(f"sqlite:///{tmp_path / 'state.db'}")
    for i in range(10):
        await kv.put(f"k{i}", b"v")
    with pytest.raises(BackendError, match="revision 2 is no longer kept"):
        await anext(kv.watch("k", prefix=True, start_revision=2))
    events = kv.watch("k", prefix=True, start_revision=6)
    assert [(await anext(events)).revision for _ in range(5)] == [6, 7, 8, 9, 10]
    await kv.close()
