"""Task queues: podkit's WorkQueue beside Celery, arq and Dramatiq on one private Redis.

    .venv/bin/python benchmarks/workqueue.py            # --tasks 100000 --procs 2 --concurrency 8
    .venv/bin/python benchmarks/workqueue.py --quick    # 10,000 tasks: a smoke run
    .venv/bin/python benchmarks/workqueue.py --peers podkit,dramatiq

Every peer runs N no-op tasks on the same redis-server (started here on a free port,
FLUSHALL between peers) with the same number of worker processes:
- podkit: `--procs` processes, each `WorkQueue.run(noop, concurrency=C)` on redis://;
  `podkit-sqlite` is the same on the embedded backend (sqlite:/// file in a temp dir);
  `--prefetch P` adds `prefetch=P` to both (default 0: off);
- celery: `celery worker --pool=prefork --concurrency=procs`, Redis broker,
  task_acks_late, task_ignore_result, worker_prefetch_multiplier 128 (the docs: large,
  "like 50 or 150", for many short tasks), without gossip, mingle and heartbeat;
- arq: one `run_worker` process per proc, default settings (`arq`) and tuned
  (`arq-tuned`: poll_delay=0.01, max_jobs=C);
- dramatiq: `dramatiq module -p procs -t C`, Redis broker.

Each peer goes through three phases:
1. enqueue: one producer process sends N tasks, no worker running, with the peer's
   fastest plain API (podkit: enqueue_many in batches of 1,000, after the first N/10,
   at most 5,000, one by one, whose rate is noted; Celery: apply_async on one producer;
   Dramatiq: send; arq: enqueue_job, 64 at a time). Gives tasks/s.
2. drain: the workers start; throughput is N / (last task finish - first task start).
3. latency: with the workers idle, N/20 tasks (100 to 1,000) are sent one by one at
   `--rate` per second (default 200, below every peer's throughput); p50/p99 of
   (start in the worker - enqueue time carried in the task).
Each task carries its enqueue wall-clock time; the worker's handler appends
(enqueued, started, finished) as 24 bytes to a file of its own process (one write per
task, the same code for every peer); the script merges the files.

Goals (printed with the ratios): podkit's tasks/s >= 2x Dramatiq's, >= 10x Celery's,
>= 5x tuned arq's; podkit-sqlite >= 20,000 tasks/s.

Peers live in their own virtualenvs, made on first use under benchmarks/.venvs/<peer>
(arq needs redis<6; Celery pins python-dateutil), never in podkit's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
MODULE = "podkit_bench_queue"  # the name this file is imported under by peers' CLIs
QUEUE = "bench"
PEERS = ["podkit", "podkit-sqlite", "celery", "arq", "arq-tuned", "dramatiq"]
VENV_OF = {"celery": "celery", "arq": "arq", "arq-tuned": "arq", "dramatiq": "dramatiq"}
PACKAGES = {
    "celery": ["celery[redis]>=5,<6"],
    "arq": ["arq", "redis<6"],
    "dramatiq": ["dramatiq[redis]"],
}
IMPORTS = {"celery": "celery, redis", "arq": "arq, redis", "dramatiq": "dramatiq, redis"}
DIST = {"podkit": "podkit", "celery": "celery", "arq": "arq", "dramatiq": "dramatiq"}
CELERY_PREFETCH = int(os.environ.get("PODKIT_BENCH_CELERY_PREFETCH", "128"))
ENQUEUE_BATCH = 1000  # podkit enqueue_many batch
ONE_BY_ONE = 5000  # podkit: that many (at most n/10) are enqueued one by one first
ARQ_INFLIGHT = 64  # arq enqueue_job calls in flight
SETUP = {  # how each peer's workers run, for the report
    "podkit": "{p} processes x WorkQueue.run(noop, concurrency={c}, prefetch={f}) on redis://",
    "podkit-sqlite": "{p} processes x WorkQueue.run(noop, concurrency={c}, prefetch={f})"
    " on sqlite:///",
    "celery": "celery worker --pool=prefork --concurrency={p} --without-gossip --without-mingle"
    " --without-heartbeat; task_acks_late, task_ignore_result, worker_prefetch_multiplier {m}",
    "arq": "{p} processes x arq run_worker, default settings (max_jobs 10, poll_delay 0.5 s)",
    "arq-tuned": "{p} processes x arq run_worker, poll_delay 0.01 s, max_jobs {c}",
    "dramatiq": "dramatiq -p {p} -t {c}, RedisBroker, default middleware",
}
GOALS = {"dramatiq": 2.0, "celery": 10.0, "arq-tuned": 5.0}  # podkit / peer throughput
SQLITE_GOAL = 20_000.0

# The worker side reads its settings from the environment, so that the peers' own CLIs
# (celery worker, dramatiq) can import this file as a module and find them.
PEER = os.environ.get("PODKIT_BENCH_PEER", "")
URL = os.environ.get("PODKIT_BENCH_URL", "")
OUT = os.environ.get("PODKIT_BENCH_OUT", "")
CONCURRENCY = int(os.environ.get("PODKIT_BENCH_CONCURRENCY", "8"))
PREFETCH = int(os.environ.get("PODKIT_BENCH_PREFETCH", "0"))

# ---------------------------------------------------------------------------- records

REC = struct.Struct("<ddd")  # enqueued, started, finished (wall clock, seconds)
_fd = -1
_fd_pid = 0
_fd_lock = threading.Lock()


def record(enqueued: float) -> None:
    """The no-op task: note when it started and finished, in this process's own file."""
    started = time.time()
    if _fd_pid != os.getpid():  # first task in this process (or a forked child)
        _open_records()
    os.write(_fd, REC.pack(enqueued, started, time.time()))


def _open_records() -> None:
    global _fd, _fd_pid
    with _fd_lock:  # worker threads (Dramatiq) race for the first task
        pid = os.getpid()
        if _fd_pid != pid:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            _fd = os.open(os.path.join(OUT, f"{pid}.rec"), flags, 0o644)
            _fd_pid = pid  # after _fd: a thread that sees the pid finds the file open


# ---------------------------------------------------------------------------- peers' tasks

if PEER == "celery":
    from celery import Celery

    app = Celery("bench", broker=URL, set_as_current=True)
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=CELERY_PREFETCH,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.noop")
    def celery_noop(enqueued: float) -> None:
        record(enqueued)


if PEER == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    dramatiq.set_broker(RedisBroker(url=URL))

    @dramatiq.actor(queue_name=QUEUE)
    def dramatiq_noop(enqueued: float) -> None:
        record(enqueued)


async def arq_noop(ctx: dict[str, Any], enqueued: float) -> None:
    record(enqueued)


async def podkit_noop(enqueued: float) -> None:
    record(enqueued)


# ---------------------------------------------------------------------------- worker roles


def podkit_worker(url: str, concurrency: int, prefetch: int) -> None:
    from podkit.aio import run_async as run
    from podkit.workqueue.core import WorkQueue

    async def main() -> None:
        wq = await WorkQueue.open(url, name=QUEUE)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, wq.stop)
        await wq.run(podkit_noop, concurrency=concurrency, prefetch=prefetch, grace=10)
        await wq.close()

    run(main())


def arq_worker(url: str, tuned: bool, concurrency: int) -> None:
    from arq.connections import RedisSettings
    from arq.worker import run_worker

    options: dict[str, Any] = {"poll_delay": 0.01, "max_jobs": concurrency} if tuned else {}

    class Settings:
        functions = [arq_noop]
        redis_settings = RedisSettings.from_dsn(url)

    for name, value in options.items():
        setattr(Settings, name, value)
    run_worker(Settings)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- producer roles


async def podkit_enqueue(url: str, n: int) -> dict[str, float]:
    """The first n/10 (at most 5,000) one by one, for the record; the rest in batches."""
    from podkit.workqueue.core import WorkQueue

    wq = await WorkQueue.open(url, name=QUEUE)
    single = min(ONE_BY_ONE, n // 10)
    start = time.perf_counter()
    for _ in range(single):
        await wq.enqueue(time.time())
    one_by_one = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(single, n, ENQUEUE_BATCH):
        now = time.time()
        await wq.enqueue_many([now] * min(ENQUEUE_BATCH, n - i))
    elapsed = time.perf_counter() - start
    await wq.close()
    out = {"rate": (n - single) / elapsed}
    if single:
        out["one_by_one"] = single / one_by_one
    return out


async def podkit_paced(url: str, n: int, rate: float) -> None:
    from podkit.workqueue.core import WorkQueue

    wq = await WorkQueue.open(url, name=QUEUE)
    for _ in paced(n, rate):
        await wq.enqueue(time.time())
    await wq.close()


async def arq_enqueue(url: str, n: int) -> float:
    from arq.connections import RedisSettings, create_pool

    pool = await create_pool(RedisSettings.from_dsn(url))
    start = time.perf_counter()
    for i in range(0, n, ARQ_INFLIGHT):
        k = min(ARQ_INFLIGHT, n - i)
        await asyncio.gather(*(pool.enqueue_job("arq_noop", time.time()) for _ in range(k)))
    elapsed = time.perf_counter() - start
    await pool.aclose()
    return n / elapsed


async def arq_paced(url: str, n: int, rate: float) -> None:
    from arq.connections import RedisSettings, create_pool

    pool = await create_pool(RedisSettings.from_dsn(url))
    for _ in paced(n, rate):
        await pool.enqueue_job("arq_noop", time.time())
    await pool.aclose()


def celery_send(n: int, rate: float | None) -> float:
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in paced(n, rate) if rate else range(n):
            celery_noop.apply_async((time.time(),), producer=producer)
    return n / (time.perf_counter() - start)


def dramatiq_send(n: int, rate: float | None) -> float:
    start = time.perf_counter()
    for _ in paced(n, rate) if rate else range(n):
        dramatiq_noop.send(time.time())
    return n / (time.perf_counter() - start)


def paced(n: int, rate: float) -> Iterator[int]:
    """Yield n times, the i-th at start + i/rate (sleeping in between)."""
    start = time.monotonic()
    for i in range(n):
        ahead = start + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        yield i


def produce(peer: str, url: str, n: int, rate: float | None) -> dict[str, float]:
    """Send n tasks, as fast as possible (the rate it got) or paced at `rate`."""
    if peer.startswith("podkit"):
        from podkit.aio import run_async as run

        if rate:
            run(podkit_paced(url, n, rate))
            return {}
        return run(podkit_enqueue(url, n))
    if peer.startswith("arq"):
        if rate:
            asyncio.run(arq_paced(url, n, rate))
            return {}
        return {"rate": asyncio.run(arq_enqueue(url, n))}
    if peer == "celery":
        return {"rate": celery_send(n, rate)}
    if peer == "dramatiq":
        return {"rate": dramatiq_send(n, rate)}
    raise SystemExit(f"unknown peer {peer}")


def role_main(args: argparse.Namespace) -> None:
    if args.role == "worker":
        if PEER.startswith("podkit"):
            podkit_worker(URL, CONCURRENCY, PREFETCH)
        elif PEER.startswith("arq"):
            arq_worker(URL, PEER == "arq-tuned", CONCURRENCY)
        else:
            raise SystemExit(f"no worker role for {PEER}: it runs under its own CLI")
    elif args.role == "enqueue":
        print(json.dumps(produce(PEER, URL, args.tasks, None)), flush=True)
    elif args.role == "paced":
        produce(PEER, URL, args.tasks, args.rate)


# ---------------------------------------------------------------------------- orchestration


@dataclass
class Result:
    peer: str
    tasks: int = 0
    enqueue_rate: float = 0.0
    throughput: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    error: str = ""
    notes: list[str] = field(default_factory=list)


def peer_python(peer: str) -> tuple[Path | None, str]:
    """The interpreter for a peer: podkit's own, or its venv's (made on first use)."""
    if peer.startswith("podkit"):
        return Path(sys.executable), ""
    venv = VENVS / VENV_OF[peer]
    kind = VENV_OF[peer]
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import {IMPORTS[kind]}"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    print(f"making {venv} with {' '.join(PACKAGES[kind])} ...", file=sys.stderr, flush=True)
    base = shutil.which("python3") or sys.executable
    steps = [
        [base, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", *PACKAGES[kind]],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            return None, f"`{' '.join(step[-3:])}` failed: {why[0]}"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"{venv}: {IMPORTS[kind]} still do not import"
    return python, ""


def version(python: Path, peer: str) -> str:
    dist = DIST["podkit" if peer.startswith("podkit") else VENV_OF[peer]]
    code = f"import importlib.metadata as m; print(m.version({dist!r}), m.version('redis'))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    lib, _, redis = done.stdout.strip().partition(" ")
    return f"{dist} {lib or '?'} (redis-py {redis or '?'})"


class Bench:
    """One run: a redis-server, a temp dir, and the processes started for each peer."""

    def __init__(self, args: argparse.Namespace, redis_url: str, workdir: Path) -> None:
        self.args = args
        self.redis_url = redis_url
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        # Peers' CLIs import this file by a name that is not `queue`, from a folder that
        # has nothing else in it.
        self.moddir = workdir / "mod"
        self.moddir.mkdir()
        (self.moddir / f"{MODULE}.py").symlink_to(Path(__file__).resolve())

    def env(self, peer: str, url: str, out: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PODKIT_BENCH_")}
        env.update(
            PODKIT_BENCH_PEER=peer,
            PODKIT_BENCH_URL=url,
            PODKIT_BENCH_OUT=str(out),
            PODKIT_BENCH_CONCURRENCY=str(self.args.concurrency),
            PODKIT_BENCH_PREFETCH=str(self.args.prefetch),
            PODKIT_BENCH_CELERY_PREFETCH=str(self.args.celery_prefetch),
            PYTHONPATH=str(self.moddir),
            PYTHONUNBUFFERED="1",
        )
        return env

    def flush(self) -> None:
        from redis import Redis

        with Redis.from_url(self.redis_url) as r:
            r.flushall()

    def workers(self, peer: str, python: Path, env: dict[str, str], log: Path) -> None:
        procs, conc = str(self.args.procs), str(self.args.concurrency)
        bindir = python.parent
        script = str(self.moddir / f"{MODULE}.py")
        if peer == "celery":
            argvs = [
                [
                    str(bindir / "celery"), "-A", MODULE, "worker", "--pool=prefork",
                    f"--concurrency={procs}", "--loglevel=WARNING", "--without-gossip",
                    "--without-mingle", "--without-heartbeat", "-Q", QUEUE,
                ]
            ]  # fmt: skip
        elif peer == "dramatiq":
            argvs = [
                [str(bindir / "dramatiq"), MODULE, "-p", procs, "-t", conc,
                 "--path", str(self.moddir)]
            ]  # fmt: skip
        else:  # podkit, arq: one process per proc
            argvs = [[str(python), script, "--role", "worker"]] * self.args.procs
        with open(log, "ab") as out:
            for argv in argvs:
                self.procs.append(
                    subprocess.Popen(
                        argv, cwd=self.moddir, env=env, stdin=subprocess.DEVNULL,
                        stdout=out, stderr=out, start_new_session=True,
                    )
                )  # fmt: skip

    def stop_workers(self, grace: float = 20.0) -> None:
        """SIGTERM each worker's process group, wait, then SIGKILL what is left."""
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.procs = []

    def produce(
        self, python: Path, env: dict[str, str], role: str, n: int, log: Path
    ) -> dict[str, float]:
        argv = [str(python), str(self.moddir / f"{MODULE}.py"), "--role", role]
        argv += ["--tasks", str(n), "--rate", str(self.args.rate)]
        with open(log, "ab") as err:
            done = subprocess.run(argv, cwd=self.moddir, env=env, stdout=subprocess.PIPE,
                                  stderr=err, timeout=3600)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"producer ({role}) exited with {done.returncode}")
        if role == "enqueue":
            got: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
            return got
        return {}

    def wait_for(self, out: Path, offsets: dict[str, int], n: int, what: str) -> None:
        """Until n records past `offsets` are in `out`; fails when none come for a while."""
        seen, last_change = -1, time.monotonic()
        while True:
            count = sum(size - offsets.get(name, 0) for name, size in sizes(out).items())
            count //= REC.size
            if count >= n:
                return
            if count != seen:
                seen, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > self.args.stall:
                raise RuntimeError(f"{what}: stalled at {count}/{n} tasks")
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{what}: a worker exited at {count}/{n} tasks")
            time.sleep(0.05)

    def run_peer(self, peer: str) -> Result:
        result = Result(peer, self.args.tasks)
        python, why = peer_python(peer)
        if python is None:
            result.error = why
            return result
        result.notes.append(version(python, peer))
        args = self.args
        result.notes.append(
            SETUP[peer].format(
                p=args.procs, c=args.concurrency, f=args.prefetch, m=args.celery_prefetch
            )
        )
        out = self.workdir / peer
        out.mkdir()
        log = self.workdir / f"{peer}.log"
        if peer == "podkit-sqlite":
            url = f"sqlite:///{self.workdir / 'sqlite' / 'bench.db'}"
            (self.workdir / "sqlite").mkdir()
        else:
            url = self.redis_url
        env = self.env(peer, url, out)
        n, m = self.args.tasks, self.args.latency_tasks
        self.flush()
        try:
            sent = self.produce(python, env, "enqueue", n, log)
            result.enqueue_rate = sent["rate"]
            if "one_by_one" in sent:
                result.notes.append(
                    f"enqueue one by one {sent['one_by_one']:,.0f}/s, "
                    f"enqueue_many({ENQUEUE_BATCH}) {sent['rate']:,.0f}/s"
                )
            progress(f"{peer}: {n:,} enqueued at {result.enqueue_rate:,.0f}/s; draining")
            self.workers(peer, python, env, log)
            self.wait_for(out, {}, n, "drain")
            records = read_records(out, {})
            first = min(r[1] for r in records)
            last = max(r[2] for r in records)
            result.throughput = n / (last - first)
            progress(
                f"{peer}: drained at {result.throughput:,.0f}/s; latency at {self.args.rate:g}/s"
            )
            offsets = sizes(out)
            self.produce(python, env, "paced", m, log)
            self.wait_for(out, offsets, m, "latency")
            lat = sorted((r[1] - r[0]) * 1000 for r in read_records(out, offsets))
            result.p50_ms, result.p99_ms = pct(lat, 0.50), pct(lat, 0.99)
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
            result.error = f"{exc} (log: {log})"
            print(tail(log), file=sys.stderr)
        finally:
            self.stop_workers()
            shutil.rmtree(self.workdir / "sqlite", ignore_errors=True)
        return result


def sizes(out: Path) -> dict[str, int]:
    return {e.name: e.stat().st_size for e in os.scandir(out) if e.name.endswith(".rec")}


def read_records(out: Path, offsets: dict[str, int]) -> list[tuple[float, float, float]]:
    records: list[tuple[float, float, float]] = []
    for name in sizes(out):
        data = (out / name).read_bytes()[offsets.get(name, 0) :]
        data = data[: len(data) - len(data) % REC.size]
        records += REC.iter_unpack(data)
    return records


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def progress(text: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- report


def report(results: list[Result], args: argparse.Namespace) -> str:
    by = {r.peer: r for r in results}
    base = by.get("podkit")
    ok = base is not None and not base.error
    lines = [
        f"{args.tasks:,} no-op tasks; {args.procs} worker processes, concurrency "
        f"{args.concurrency} (podkit prefetch {args.prefetch}); latency: "
        f"{args.latency_tasks:,} tasks sent one by one at "
        f"{args.rate:g}/s to idle workers; {os.cpu_count()} CPUs; load average at start "
        f"{args.load}, at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "| peer | enqueue/s | tasks/s | p50 latency | p99 latency | podkit/peer tasks/s "
        "| podkit/peer enqueue/s | goal | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.peer} | - | - | - | - | - | - | - | failed: {r.error} |")
            continue
        ratio = enq = goal = met = "-"
        if ok and base is not None and r.peer in GOALS:
            ratio = f"{base.throughput / r.throughput:.1f}x"
            enq = f"{base.enqueue_rate / r.enqueue_rate:.1f}x"
            goal = f">= {GOALS[r.peer]:g}x"
            met = "**yes**" if base.throughput / r.throughput >= GOALS[r.peer] else "no"
        elif r.peer == "podkit-sqlite":
            goal = f">= {SQLITE_GOAL:,.0f}/s"
            met = "**yes**" if r.throughput >= SQLITE_GOAL else "no"
        elif ok and base is not None and r.peer != "podkit":
            ratio = f"{base.throughput / r.throughput:.1f}x"
            enq = f"{base.enqueue_rate / r.enqueue_rate:.1f}x"
        lines.append(
            f"| {r.peer} | {r.enqueue_rate:,.0f} | {r.throughput:,.0f} | {r.p50_ms:.1f} ms "
            f"| {r.p99_ms:.1f} ms | {ratio} | {enq} | {goal} | {met} |"
        )
    lines.append("")
    lines += [f"- {r.peer}: {'; '.join(r.notes)}" for r in results if r.notes]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import RedisServer

    if args.quick:
        args.tasks = 10_000
    if args.latency_tasks is None:
        args.latency_tasks = max(100, min(1_000, args.tasks // 20))
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown peers {unknown}: choose from {','.join(PEERS)}")
    args.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="podkit-bench-queue-"))
    server = RedisServer()
    results: list[Result] = []
    bench: Bench | None = None
    try:
        server.start()
        bench = Bench(args, server.url, workdir)
        for peer in peers:
            progress(f"{peer}: start")
            results.append(bench.run_peer(peer))
    finally:
        if bench is not None:
            bench.stop_workers()
        server.remove()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, args))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--procs", type=int, default=2, help="worker processes per peer")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks in hand per process")
    parser.add_argument("--prefetch", type=int, default=0, help="podkit: items leased ahead")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--quick", action="store_true", help="10,000 tasks")
    parser.add_argument("--rate", type=float, default=200, help="latency phase: tasks/s")
    parser.add_argument("--latency-tasks", type=int, help="default: tasks/20, 100 to 1,000")
    parser.add_argument("--celery-prefetch", type=int, default=CELERY_PREFETCH)
    parser.add_argument("--stall", type=float, default=60, help="give up after s without progress")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, records)")
    parser.add_argument("--role", choices=["worker", "enqueue", "paced"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.role:
        role_main(arguments)
    else:
        main(arguments)
