"""Work-queue chaos: worker processes killed with SIGKILL at random, one backend restart.

    python tests/faults/queue_chaos.py --items 100000 --backend redis|nats|sqlite

Starts a private backend (Redis with AOF `appendfsync always`; nats-server with JetStream
file storage; or an SQLite file), enqueues `items` items in batches (every even item with
the idempotency key `k<i>`, enqueued a second time to check the queue holds it once), then
runs `workers` worker processes (this file with `worker ...`), each `WorkQueue.run(handler,
concurrency=16)` whose handler records the item's effect by appending its number to a file
of its own (one `write` per item, no user-space buffer). Every 1-3 s (uniform) a random
worker is killed with SIGKILL and a replacement started; once, half way through, the
backend is restarted (SIGTERM, start again on the same port and data dir). When the queue
is empty (depth 0, in flight 0) the workers are stopped with SIGTERM, and the effects
checked: every item's effect recorded at least once (lost must be 0), dead letters must be
0; items whose effect was recorded more than once are counted: after a kill -9 they are
expected, as a handler's effect happens before its ack.

Exit status 0 when nothing was lost, nothing dead-lettered, no worker crashed or hung.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
TESTS = HERE.parents[1]
QUEUE = "chaos"
BATCH = 1000


# ---------------------------------------------------------------------------- worker


async def _open_queue(url: str, visibility: float, max_attempts: int, patience: float) -> Any:
    """Open the queue, retrying while the backend is away (a replacement worker may start
    while the server restarts)."""
    from podkit.backends import BackendError
    from podkit.workqueue import WorkQueue

    deadline = time.monotonic() + patience
    while True:
        try:
            return await WorkQueue.open(
                url, QUEUE, visibility=visibility, max_attempts=max_attempts
            )
        except BackendError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def worker_main(
    url: str, out: str, *, concurrency: int, visibility: float, work_ms: float, max_attempts: int
) -> None:
    """One worker process: records each item's effect (its number, one line) in `out`;
    a keyed item's effect is `apply_once` in the backend's KV, noted in `out` too
    (`again N` when an earlier delivery had already applied it)."""
    from podkit.backends import open_kv
    from podkit.workqueue import apply_once

    wq = await _open_queue(url, visibility, max_attempts, patience=30.0)
    kv = await open_kv(url)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rng = random.Random()

    async def handler(item: dict[str, int]) -> None:
        if work_ms > 0:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * work_ms / 1000)
        i = item["i"]
        if i % 2 == 0 and not await apply_once(kv, f"{QUEUE}/k{i}"):
            os.write(fd, b"again %d\n" % i)  # applied before: not applied twice
            return
        os.write(fd, b"%d\n" % i)  # the effect: in the file before the ack

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, wq.stop)
    print(f"worker {os.getpid()} started", file=sys.stderr, flush=True)
    stats = await wq.run(handler, concurrency=concurrency, grace=10.0)
    print(
        f"worker {os.getpid()} stopped: done {stats.done} failed {stats.failed} "
        f"returned {stats.returned}",
        file=sys.stderr,
        flush=True,
    )
    os.close(fd)
    await wq.close()


# ---------------------------------------------------------------------------- runner


@dataclass
class ChaosResult:
    """What a chaos run did and found."""

    backend: str
    items: int
    lost: list[int] = field(default_factory=list)  # no effect recorded
    duplicates: int = 0  # items whose effect was recorded more than once
    extra_effects: int = 0  # effects beyond the first, over all items
    keyed_duplicates: int = 0  # of `duplicates`, items enqueued with a key: must be 0
    keyed_applied: int = 0  # keyed items whose effect apply_once recorded
    suppressed: int = 0  # redeliveries of keyed items that apply_once did not apply again
    unknown: int = 0  # effect lines naming no enqueued item (or torn lines)
    dead: int = 0
    dead_letters: list[str] = field(default_factory=list)
    kills: int = 0
    restarts: int = 0
    seconds: float = 0.0  # from the first worker's start until the queue was empty
    enqueue_seconds: float = 0.0
    keyed: int = 0
    keyed_enqueued_once: bool = False  # second enqueue of keyed items added none
    enqueue_problems: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)  # workers that exited by themselves
    hung: list[str] = field(default_factory=list)  # workers that did not stop on SIGTERM
    timed_out: bool = False
    final_stats: tuple[int, int, int] | None = None  # depth, in flight, dead at the end
    workdir: str = ""
    seed: int = 0

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and self.dead == 0
            and self.unknown == 0
            and self.keyed_enqueued_once
            and self.keyed_duplicates == 0
            and not self.crashed
            and not self.hung
            and not self.timed_out
        )

    def summary(self) -> str:
        return (
            f"items {self.items} lost {len(self.lost)} duplicates {self.duplicates} "
            f"(keyed {self.keyed_duplicates}, {self.suppressed} redeliveries not applied) "
            f"dead {self.dead} kills {self.kills} backend restarts {self.restarts} "
            f"seconds {self.seconds:.1f}"
        )

    def details(self) -> str:
        lines = [
            f"backend {self.backend}, seed {self.seed}, workdir {self.workdir}",
            f"enqueue: {self.items} items in {self.enqueue_seconds:.1f}s, {self.keyed} keyed, "
            f"keyed enqueued once: {self.keyed_enqueued_once}",
            f"effects: extra {self.extra_effects}, keyed items applied {self.keyed_applied}, "
            f"duplicated {self.keyed_duplicates}, redeliveries not applied again "
            f"{self.suppressed}, unknown lines {self.unknown}",
            f"final stats (depth, in flight, dead): {self.final_stats}, "
            f"timed out: {self.timed_out}",
        ]
        lines += [f"enqueue problem: {p}" for p in self.enqueue_problems]
        if self.lost:
            lines.append(f"lost ({len(self.lost)}): {self.lost[:50]}")
        lines += [f"dead letter: {d}" for d in self.dead_letters[:20]]
        lines += [f"crashed worker: {c}" for c in self.crashed]
        lines += [f"hung worker: {h}" for h in self.hung]
        return "\n".join(lines)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    log: Path
    started: float


class _Backend:
    """A private backend: a server (restartable) or an SQLite file."""

    def __init__(self, kind: str, workdir: Path) -> None:
        if str(TESTS) not in sys.path:
            sys.path.insert(0, str(TESTS))
        from servers import NatsServer, RedisServer, Server

        self.kind = kind
        self.server: Server | None = None
        if kind == "redis":
            self.server = RedisServer(appendonly=True, extra_args=["--appendfsync", "always"])
        elif kind == "nats":
            self.server = NatsServer()  # JetStream, file storage under its dir
        elif kind == "sqlite":
            self.url = f"sqlite:///{workdir / 'queue.db'}"
        else:
            raise ValueError(f"unknown backend {kind!r}: redis, nats or sqlite")
        if self.server is not None:
            self.server.start()
            self.url = self.server.url

    @property
    def restartable(self) -> bool:
        return self.server is not None

    def restart(self, down: float = 0.0) -> None:
        """Stop (SIGTERM), stay down `down` seconds, start on the same port and dir."""
        assert self.server is not None
        self.server.stop()
        time.sleep(down)
        self.server.start(timeout=30.0)

    def close(self, keep: bool) -> None:
        if self.server is None:
            return
        if keep:
            self.server.stop()
            print(f"kept {self.server.dir}\n{self.server.log_tail(12)}", file=sys.stderr)
        else:
            self.server.remove()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _enqueue(wq: Any, n: int, result: ChaosResult) -> None:
    """Enqueue items 0..n-1 in batches, even ones keyed `k<i>`; then enqueue the keyed ones
    again and check that added nothing."""
    keyed_ids: dict[int, str] = {}
    for lo in range(0, n, BATCH):
        numbers = range(lo, min(n, lo + BATCH))
        keys = [f"k{i}" if i % 2 == 0 else None for i in numbers]
        ids = await wq.enqueue_many([{"i": i} for i in numbers], keys=keys)
        keyed_ids.update((i, id_) for i, id_ in zip(numbers, ids, strict=True) if i % 2 == 0)
    result.keyed = len(keyed_ids)
    again = sorted(keyed_ids)
    mismatched = 0
    for lo in range(0, len(again), BATCH):
        numbers = again[lo : lo + BATCH]
        ids = await wq.enqueue_many([{"i": i} for i in numbers], keys=[f"k{i}" for i in numbers])
        mismatched += sum(keyed_ids[i] != id_ for i, id_ in zip(numbers, ids, strict=True))
    stats = await wq.stats()
    if mismatched:
        result.enqueue_problems.append(f"{mismatched} keyed re-enqueues returned a new id")
    if (stats.depth, stats.in_flight) != (n, 0):
        result.enqueue_problems.append(
            f"after enqueueing {n} items (and {len(again)} again): depth {stats.depth}, "
            f"in flight {stats.in_flight}"
        )
    result.keyed_enqueued_once = not result.enqueue_problems


async def _stats(wq: Any) -> tuple[int, int, int] | None:
    try:
        s = await asyncio.wait_for(wq.stats(), 10.0)
    except Exception:
        return None  # the backend is away (restarting)
    return s.depth, s.in_flight, s.dead


async def chaos(
    backend: str = "redis",
    items: int = 100_000,
    *,
    workers: int = 3,
    concurrency: int = 16,
    visibility: float = 3.0,
    work_ms: float = 2.0,
    max_attempts: int = 5,
    kill_every: tuple[float, float] = (1.0, 3.0),
    restart: bool = True,
    down: float = 0.0,
    timeout: float | None = None,
    seed: int | None = None,
    workdir: Path | None = None,
    keep: bool | None = None,
    log: Any = None,
) -> ChaosResult:
    """Run the chaos test (see the module docstring); returns what it found.

    `keep`: keep the work dir and server dir (None: keep them when the run failed)."""
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    seed = seed if seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    timeout = timeout if timeout is not None else 60.0 + items * 0.01
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="podkit-queue-chaos-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    result = ChaosResult(backend, items, workdir=str(work), seed=seed)
    server = _Backend(backend, work)
    wq: Any = None
    live: list[_Worker] = []
    all_workers: list[_Worker] = []
    try:
        from podkit.workqueue import WorkQueue

        wq = await WorkQueue.open(server.url, QUEUE, max_attempts=max_attempts)
        t0 = time.monotonic()
        await _enqueue(wq, items, result)
        result.enqueue_seconds = time.monotonic() - t0
        say(f"{backend}: enqueued {items} items in {result.enqueue_seconds:.1f}s ({server.url})")

        def spawn() -> _Worker:
            index = len(all_workers)
            log_path = work / f"worker-{index}.log"
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(
                    [
                        sys.executable, str(HERE), "worker", server.url,
                        str(work / f"effects-{index}.txt"),
                        "--concurrency", str(concurrency), "--visibility", str(visibility),
                        "--work-ms", str(work_ms), "--max-attempts", str(max_attempts),
                    ],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                )  # fmt: skip
            w = _Worker(index, proc, log_path, time.monotonic())
            all_workers.append(w)
            live.append(w)
            return w

        start = time.monotonic()
        for _ in range(workers):
            spawn()
        next_kill = start + rng.uniform(*kill_every)
        restart_due = restart and server.restartable
        last_report = start
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for w in list(live):  # a worker that exited by itself: a crash
                if w.proc.poll() is not None:
                    live.remove(w)
                    result.crashed.append(
                        f"worker {w.index} pid {w.proc.pid} exited {w.proc.returncode} "
                        f"after {now - w.started:.1f}s: {_tail(w.log)}"
                    )
                    say(f"{backend}: {result.crashed[-1]}")
                    spawn()
            stats = await _stats(wq)
            now = time.monotonic()
            if stats is not None:
                depth, in_flight, dead = stats
                if depth == 0 and in_flight == 0:
                    result.seconds = now - start
                    break
                if restart_due and items - depth - in_flight >= items / 2:
                    restart_due = False
                    say(f"{backend}: restarting the backend at {now - start:.1f}s ({stats})")
                    t = time.monotonic()
                    await asyncio.to_thread(server.restart, down)
                    result.restarts += 1
                    say(f"{backend}: backend back after {time.monotonic() - t:.1f}s")
                    continue
                if now - last_report >= 5:
                    last_report = now
                    say(
                        f"{backend}: {now - start:.0f}s depth {depth} in flight {in_flight} "
                        f"dead {dead} kills {result.kills}"
                    )
            if now - start > timeout:
                result.timed_out = True
                result.seconds = now - start
                say(f"{backend}: timed out after {timeout:.0f}s, stats {stats}")
                break
            if now >= next_kill:
                victim = rng.choice(live)
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                live.remove(victim)
                result.kills += 1
                spawn()
                next_kill = time.monotonic() + rng.uniform(*kill_every)

        for w in live:  # a replacement may still be starting: wait for its signal handler
            while w.proc.poll() is None and time.monotonic() - w.started < 60:
                if b"started" in w.log.read_bytes():
                    break
                await asyncio.sleep(0.05)
        for w in live:  # stop gracefully: finish or return the items in hand
            w.proc.send_signal(signal.SIGTERM)
        for w in live:
            try:
                await asyncio.to_thread(w.proc.wait, 30.0)
            except subprocess.TimeoutExpired:
                result.hung.append(f"worker {w.index} pid {w.proc.pid}: {_tail(w.log)}")
                w.proc.kill()
                w.proc.wait()
            else:
                if w.proc.returncode != 0:
                    result.crashed.append(
                        f"worker {w.index} pid {w.proc.pid} exited {w.proc.returncode} "
                        f"on SIGTERM: {_tail(w.log)}"
                    )
        live.clear()

        final = await _stats(wq)
        result.final_stats = final
        result.dead = final[2] if final is not None else -1
        if result.dead:
            result.dead_letters = [
                f"{m.id} after {m.attempts} attempts: {m.last_error}"
                for m in await wq.queue.dead_letters(100)
            ]
        from podkit.backends import open_kv
        from podkit.workqueue import EFFECTS

        kv = await open_kv(server.url)
        try:
            prefix = f"{EFFECTS}{QUEUE}/k"
            applied = {int(e.key[len(prefix) :]) for e in await kv.range(prefix)}
        finally:
            await kv.close()
        _check_effects(work, items, result, applied)
        return result
    finally:
        for w in live:
            with contextlib.suppress(OSError):
                w.proc.kill()
            w.proc.wait()
        if wq is not None:
            with contextlib.suppress(Exception):
                await wq.close()
        keep_now = keep if keep is not None else not result.ok
        server.close(keep_now)
        if own_dir and not keep_now:
            shutil.rmtree(work, ignore_errors=True)


def _check_effects(work: Path, items: int, result: ChaosResult, applied: set[int]) -> None:
    """Unkeyed items: their lines in the effect files. Keyed items: the `apply_once`
    records (`applied`), which hold each at most once by construction; a keyed item's
    line may be missing when its worker died between the record and the line."""
    counts: Counter[int] = Counter()
    for path in work.glob("effects-*.txt"):
        for line in path.read_bytes().splitlines():
            again = line.startswith(b"again ")
            try:
                i = int(line[6:] if again else line)
            except ValueError:
                result.unknown += 1
                continue
            if not 0 <= i < items:
                result.unknown += 1
            elif again:
                result.suppressed += 1
            else:
                counts[i] += 1
    result.keyed_applied = len(applied)
    result.lost = [i for i in range(items) if (i not in applied if i % 2 == 0 else counts[i] == 0)]
    dup = [i for i, c in counts.items() if c > 1]
    result.duplicates = len(dup)
    result.keyed_duplicates = sum(1 for i in dup if i % 2 == 0)
    result.extra_effects = sum(c - 1 for c in counts.values() if c > 1)


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        p = argparse.ArgumentParser(prog="queue_chaos.py worker")
        p.add_argument("url")
        p.add_argument("out")
        p.add_argument("--concurrency", type=int, default=16)
        p.add_argument("--visibility", type=float, default=3.0)
        p.add_argument("--work-ms", type=float, default=2.0)
        p.add_argument("--max-attempts", type=int, default=5)
        a = p.parse_args(argv[1:])
        asyncio.run(
            worker_main(
                a.url, a.out, concurrency=a.concurrency, visibility=a.visibility,
                work_ms=a.work_ms, max_attempts=a.max_attempts,
            )
        )  # fmt: skip
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--backend", choices=["redis", "nats", "sqlite"], default="redis")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--visibility", type=float, default=3.0)
    p.add_argument("--work-ms", type=float, default=2.0, help="mean handler time per item")
    p.add_argument("--kill-min", type=float, default=1.0)
    p.add_argument("--kill-max", type=float, default=3.0)
    p.add_argument("--no-restart", action="store_true", help="do not restart the backend")
    p.add_argument("--down", type=float, default=0.0, help="seconds the backend stays down")
    p.add_argument("--timeout", type=float, default=None, help="default 60 s + 10 ms per item")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the work dir even when green")
    a = p.parse_args(argv)
    result = asyncio.run(
        chaos(
            a.backend, a.items, workers=a.workers, concurrency=a.concurrency,
            visibility=a.visibility, work_ms=a.work_ms, kill_every=(a.kill_min, a.kill_max),
            restart=not a.no_restart, down=a.down, timeout=a.timeout, seed=a.seed,
            keep=True if a.keep else None,
        )
    )  # fmt: skip
    print(result.details())
    print(result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
