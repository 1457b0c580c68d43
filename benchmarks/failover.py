"""Leader failover time: podkit's LeaderElection beside tooz's, on real servers, in one run.

    .venv/bin/python benchmarks/failover.py [--backends etcd,redis,nats] [--ttls 0.5,1,2]
                                            [--rounds 5] [--quick] [--no-tooz]

What it measures: 3 candidate processes (benchmarks/_candidate.py) compete for one
election; the leader is killed with SIGKILL at a random moment (a random delay of up to
one TTL after the group settled, so not aligned with its renewals); the time from the kill
to the moment the NEW leader can act is the failover time. A fresh candidate replaces the
killed one (after a random pause of up to 1 s, as a restarted pod would) before the next
round, so there are always 3.
- podkit: `LeaderElection(kv, name, identity, ttl)`; the leader does a fenced write
  (`FencedResource(kv, key).write(token, ...)`) as soon as it leads and every 50 ms after:
  failover = kill -> the new leader's first successful fenced write.
- tooz (its own venv, benchmarks/.venvs/tooz, made on first use: `pip install tooz redis
  etcd3gw`): `get_coordinator(url)`, `start(start_heart=True)`, join a group,
  `watch_elected_as_leader`, `run_watchers()` every 20 ms. tooz has no fencing: failover =
  kill -> the new leader's elected callback. Its URL `timeout` (lock and membership TTL)
  is whole seconds, so only whole-second TTLs are measured.
- For reference (not measured: no Kubernetes API server can run here), client-go's
  leader election with its defaults.
Columns: median and max failover, both over TTL (the goal is <= 1.2 x TTL), and the median
time from the dead leader's lease expiry (its last renewal sent + TTL) to the new leader:
what the backend and the library add beyond the TTL itself.
Each backend's server is started on a free port (redis-server, nats-server and etcd must
be installed, see /work/shared/SERVERS.md); everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import EtcdServer, NatsServer, RedisServer, Server

HERE = Path(__file__).resolve().parent
CANDIDATE = HERE / "_candidate.py"
TOOZ_VENV = HERE / ".venvs" / "tooz"
TOOZ_PACKAGES = ["tooz", "redis", "etcd3gw"]
CANDIDATES = 3
GOAL = 1.2  # failover <= GOAL x TTL
SETTLE = 0.2  # seconds after the group settled before the random kill delay starts
# A candidate (re)starts after a random pause of up to this many seconds, as a restarted
# pod would: candidates started in lockstep would run their periodic work (a NATS lease
# sweep, say) in phase with each other, which no real deployment does.
RESTART_JITTER = 1.0
START_TIMEOUT = 30.0  # for a candidate to queue (interpreter start, imports, connect)
ETCD_ARGS = ["--heartbeat-interval=10", "--election-timeout=100"]  # minimum lease TTL 1 s
K8S_NOTE = (
    "client-go leaderelection defaults: LeaseDuration 15 s, RenewDeadline 10 s, "
    "RetryPeriod 2 s: a crashed leader's Lease is taken over once LeaseDuration has passed "
    "since its last renewal, noticed at the next RetryPeriod tick (jittered): ~15-17 s"
)


# ---------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    identity: str
    proc: subprocess.Popen[str]
    log: TextIO
    queued: bool = False
    renewed: float = 0.0  # wall time the last lease renewal was sent
    gained: float = 0.0  # podkit: campaign() returned
    leading: float = 0.0  # the `leader` event: fenced write done / elected callback ran
    killed: bool = False
    exited: bool = False


@dataclass
class Anomalies:
    lines: list[str] = field(default_factory=list)

    def add(self, cell: str, text: str) -> None:
        line = f"{cell}: {text}"
        self.lines.append(line)
        print(f"  ! {line}", file=sys.stderr, flush=True)


class Group:
    """Candidate processes of one cell, their events read by one thread each."""

    def __init__(
        self, cell: str, argv: Callable[[str], list[str]], logs: Path, notes: Anomalies
    ) -> None:
        self.cell = cell
        self.argv = argv
        self.logs = logs
        self.notes = notes
        self.members: list[Candidate] = []
        self.events: queue.Queue[tuple[Candidate, dict[str, Any] | None]] = queue.Queue()
        self.leader: Candidate | None = None
        self.unsupported = ""
        self._n = 0

    def spawn(self) -> Candidate:
        self._n += 1
        identity = f"c{self._n}"
        log = open(self.logs / f"{self.cell}-{identity}.log", "w")  # noqa: SIM115 - closed in close()
        proc = subprocess.Popen(
            self.argv(identity),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,  # a Ctrl-C reaches only this script, which cleans up
        )
        cand = Candidate(identity, proc, log)
        self.members.append(cand)
        threading.Thread(target=self._read, args=(cand,), daemon=True).start()
        return cand

    def _read(self, cand: Candidate) -> None:
        assert cand.proc.stdout is not None
        for line in cand.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.put((cand, json.loads(line)))
        self.events.put((cand, None))

    def alive(self) -> list[Candidate]:
        return [c for c in self.members if not c.killed and not c.exited]

    def pump(self, until: float, done: Callable[[], bool] = lambda: False) -> bool:
        """Handle events until `done()` or the monotonic time `until`; True if done."""
        while not done():
            left = until - time.monotonic()
            if left <= 0:
                return False
            try:
                cand, event = self.events.get(timeout=min(left, 0.05))
            except queue.Empty:
                continue
            self._handle(cand, event)
        return True

    def _handle(self, cand: Candidate, event: dict[str, Any] | None) -> None:
        if event is None:
            cand.exited = True
            if not cand.killed and not self.unsupported:
                self.notes.add(
                    self.cell, f"candidate {cand.identity} exited by itself: {self.tail(cand)}"
                )
            return
        kind, t = event["event"], float(event["t"])
        if kind == "queued":
            cand.queued = True
        elif kind == "renew":
            cand.renewed = max(cand.renewed, t)
        elif kind == "gained":
            cand.gained = t
        elif kind == "leader":
            cand.leading = t
            old = self.leader
            if old is not None and old is not cand and not old.killed:
                self.notes.add(
                    self.cell,
                    f"leadership moved from {old.identity} to {cand.identity} without a kill",
                )
            self.leader = cand
        elif kind == "unsupported":
            self.unsupported = str(event.get("why", "unsupported"))
        elif kind in ("lost", "stale", "error") and not cand.killed:
            why = event.get("why", f"token {event.get('token')}")
            self.notes.add(self.cell, f"candidate {cand.identity}: {kind}: {why}")

    def tail(self, cand: Candidate) -> str:
        cand.log.flush()
        text = (self.logs / f"{self.cell}-{cand.identity}.log").read_text(errors="replace")
        last = [ln for ln in text.splitlines() if ln.strip()][-3:]
        return " | ".join(last) or f"exit code {cand.proc.poll()}"

    def settle(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until CANDIDATES are alive and queued and a live leader has acted."""

        def settled() -> bool:
            live = self.alive()
            return bool(self.unsupported) or (
                len(live) == CANDIDATES
                and all(c.queued for c in live)
                and self.leader is not None
                and self.leader in live
            )

        if not self.pump(time.monotonic() + timeout, settled):
            states = ", ".join(
                f"{c.identity}: {'queued' if c.queued else 'not queued'}"
                + (" (exited)" if c.exited else "")
                for c in self.members
                if not c.killed
            )
            raise RuntimeError(f"{self.cell}: candidates did not settle in {timeout}s ({states})")

    def kill(self, cand: Candidate) -> None:
        cand.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(cand.proc.pid, signal.SIGKILL)
        cand.proc.wait()

    def close(self) -> None:
        for cand in self.members:
            if cand.proc.poll() is None:
                cand.killed = True
                cand.proc.kill()
        for cand in self.members:
            with contextlib.suppress(subprocess.TimeoutExpired):
                cand.proc.wait(5)
            cand.log.close()


@contextlib.contextmanager
def group(
    cell: str, argv: Callable[[str], list[str]], logs: Path, notes: Anomalies
) -> Iterator[Group]:
    g = Group(cell, argv, logs, notes)
    try:
        yield g
    finally:
        g.close()


# ---------------------------------------------------------------------------- one cell


@dataclass
class Result:
    impl: str
    backend: str
    ttl: float  # the TTL asked for
    lease: float  # the lease the server actually keeps (etcd: whole seconds)
    measures: str
    failovers: list[float] = field(default_factory=list)
    after_expiry: list[float] = field(default_factory=list)
    write_after: list[float] = field(default_factory=list)  # podkit: campaign() -> 1st write
    note: str = ""


def measure(
    g: Group, result: Result, rounds: int, notes: Anomalies, rng: random.Random, kind: str
) -> None:
    """`rounds` kills of the current leader; fills `result`."""

    def restart() -> None:
        g.pump(time.monotonic() + rng.uniform(0, RESTART_JITTER))
        g.spawn()

    for _ in range(CANDIDATES):
        restart()
    g.settle()
    if g.unsupported:
        result.note = f"not supported: {g.unsupported}"
        return
    for n in range(rounds):
        # a random moment: not aligned with the leader's renewals (every TTL/3 or TTL/2)
        g.pump(time.monotonic() + SETTLE + rng.uniform(0, result.ttl))
        old = g.leader
        if old is None or old.killed or old.exited or len(g.alive()) < CANDIDATES:
            g.settle()
            old = g.leader
        assert old is not None
        # a tooz leader's lock TTL also starts when it took the lock
        renewed = max(old.renewed, old.leading) if kind == "tooz" else old.renewed
        killed_at = time.time()
        g.kill(old)
        limit = time.monotonic() + 10 * result.lease + 10

        def taken_over(old: Candidate = old, killed_at: float = killed_at) -> bool:
            new = g.leader
            return new is not None and new is not old and new.leading >= killed_at

        if not g.pump(limit, taken_over):
            notes.add(g.cell, f"round {n + 1}: no new leader within {10 * result.lease + 10:.0f}s")
            restart()
            g.settle()
            continue
        new = g.leader
        assert new is not None
        result.failovers.append(new.leading - killed_at)
        if renewed:
            result.after_expiry.append(new.leading - (renewed + result.lease))
        if kind == "podkit" and new.gained >= killed_at:
            result.write_after.append(new.leading - new.gained)
        print(
            f"  {g.cell} round {n + 1}: {new.leading - killed_at:.3f}s "
            f"({old.identity} -> {new.identity})",
            file=sys.stderr,
            flush=True,
        )
        restart()
        g.settle()


def podkit_cell(
    server: Server, backend: str, ttl: float, rounds: int, logs: Path, notes: Anomalies, seed: int
) -> Result:
    lease = float(max(1, math.ceil(ttl))) if backend == "etcd" else ttl
    result = Result("podkit", backend, ttl, lease, "kill -> new leader's 1st fenced write")
    cell = f"podkit-{backend}-{ttl:g}"
    url = server.url
    name = f"failover-{ttl:g}-{os.getpid()}"

    def argv(identity: str) -> list[str]:
        return [sys.executable, str(CANDIDATE), "podkit", url, name, identity, str(ttl)]

    with group(cell, argv, logs, notes) as g:
        measure(g, result, rounds, notes, random.Random(f"{seed}:{cell}"), "podkit")
    return result


def tooz_cell(
    python: Path,
    url: str,
    backend: str,
    ttl: float,
    rounds: int,
    logs: Path,
    notes: Anomalies,
    seed: int,
) -> Result:
    result = Result("tooz", backend, ttl, ttl, "kill -> new leader's elected callback")
    cell = f"tooz-{backend}-{ttl:g}"
    name = f"failover-{ttl:g}-{os.getpid()}"

    def argv(identity: str) -> list[str]:
        return [str(python), str(CANDIDATE), "tooz", url, name, identity]

    with group(cell, argv, logs, notes) as g:
        measure(g, result, rounds, notes, random.Random(f"{seed}:{cell}"), "tooz")
    return result


# ---------------------------------------------------------------------------- tooz venv


def tooz_python() -> tuple[Path | None, str]:
    """The tooz venv's interpreter, made and filled on first use; or None and why not."""
    python = TOOZ_VENV / "bin" / "python"
    check = [str(python), "-c", "import tooz, redis, etcd3gw, tooz.drivers.redis"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    print(f"making {TOOZ_VENV} with {' '.join(TOOZ_PACKAGES)} ...", file=sys.stderr, flush=True)
    base = shutil.which("python3") or sys.executable
    steps = [
        [base, "-m", "venv", str(TOOZ_VENV)],
        [str(python), "-m", "pip", "install", "-q", *TOOZ_PACKAGES],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            return None, f"`{' '.join(step[-3:])}` failed: {why[0]}"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"{TOOZ_VENV}: tooz still does not import"
    return python, ""


def tooz_version(python: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('tooz'))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def tooz_url(backend: str, server: Server, ttl: float) -> str | None:
    timeout = int(ttl)
    if backend == "redis":
        return f"redis://{server.host}:{server.port}?timeout={timeout}"
    if backend == "etcd":
        return f"etcd3+http://{server.host}:{server.port}?timeout={timeout}"
    return None


# ---------------------------------------------------------------------------- report


def fmt(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def table(results: list[Result]) -> str:
    head = (
        f"{'impl':7} {'backend':8} {'TTL':>5} {'lease':>5} {'n':>2} {'median':>7} {'max':>7} "
        f"{'med/TTL':>7} {'max/TTL':>7} {'<=1.2x':>6} {'expiry->new':>11} {'elected->write':>14}"
        f"  measures"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        if not r.failovers:
            rows.append(
                f"{r.impl:7} {r.backend:8} {r.ttl:>5.1f} {'':>5} {0:>2} "
                f"{'n/a':>7}  {r.note or 'no measurement'}"
            )
            continue
        med, top = statistics.median(r.failovers), max(r.failovers)
        ok = "yes" if top <= GOAL * r.ttl else ("median" if med <= GOAL * r.ttl else "NO")
        expiry = statistics.median(r.after_expiry) if r.after_expiry else None
        write = statistics.median(r.write_after) * 1000 if r.write_after else None
        rows.append(
            f"{r.impl:7} {r.backend:8} {r.ttl:>5.1f} {r.lease:>5.1f} {len(r.failovers):>2} "
            f"{fmt(med):>7} {fmt(top):>7} {fmt(med / r.ttl, 'x'):>7} {fmt(top / r.ttl, 'x'):>7} "
            f"{ok:>6} {fmt(expiry):>11} {fmt(write, 'ms'):>14}  {r.measures}"
        )
    rows.append(
        f"{'k8s':7} {'Lease':8} {15.0:>5.1f} {15.0:>5.1f} {'-':>2} {'~15-17s':>7} {'~17s':>7} "
        f"{'~1.0x':>7} {'~1.13x':>7} {'':>6} {'0-2s':>11} {'':>14}  reference, not measured"
    )
    return "\n".join(rows)


# ---------------------------------------------------------------------------- main


def start_server(backend: str) -> Server:
    server: Server
    if backend == "etcd":
        server = EtcdServer(extra_args=ETCD_ARGS)
    elif backend == "redis":
        server = RedisServer()
    elif backend == "nats":
        server = NatsServer()
    else:
        raise SystemExit(f"unknown backend {backend!r} (etcd, redis, nats)")
    server.start()
    return server


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backends", default="etcd,redis,nats", help="comma-separated")
    ap.add_argument("--ttls", default="0.5,1.0,2.0", help="comma-separated seconds")
    ap.add_argument("--rounds", type=int, default=5, help="leader kills per cell")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, TTL 1.0 only")
    ap.add_argument("--no-tooz", action="store_true", help="measure podkit only")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random kill moments")
    args = ap.parse_args()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.ttls = [float(t) for t in args.ttls.split(",") if t.strip()]
    if args.quick:
        args.rounds, args.ttls = 1, [1.0]
    if args.rounds < 1 or any(t <= 0 for t in args.ttls):
        ap.error("--rounds must be >= 1 and every TTL > 0")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    notes = Anomalies()
    skipped: list[str] = []
    results: list[Result] = []
    logs = Path(tempfile.mkdtemp(prefix="podkit-failover-"))
    python: Path | None = None
    if not args.no_tooz and any(b in ("redis", "etcd") for b in args.backends):
        python, why = tooz_python()
        if python is None:
            skipped.append(f"tooz: not measured: {why}")
        else:
            skipped.append(f"tooz {tooz_version(python)} from {TOOZ_VENV}")
    started = time.monotonic()
    for backend in args.backends:
        server = start_server(backend)
        try:
            for ttl in args.ttls:
                if backend == "etcd" and ttl < 1:
                    skipped.append(
                        f"podkit etcd TTL {ttl:g}: not measured: etcd leases are whole seconds, "
                        f"at least etcd's minimum TTL (1 s here, with {' '.join(ETCD_ARGS)}); "
                        f"the driver would round {ttl:g} s up to 1 s"
                    )
                    continue
                print(f"podkit {backend} TTL {ttl:g} ...", file=sys.stderr, flush=True)
                results.append(podkit_cell(server, backend, ttl, args.rounds, logs, notes, seed))
            if python is None:
                continue
            url = tooz_url(backend, server, 1)
            if url is None:
                skipped.append(f"tooz {backend}: tooz has no {backend} driver")
                continue
            whole = [t for t in args.ttls if t == int(t) and t >= 1]
            for ttl in whole:
                print(f"tooz {backend} TTL {ttl:g} ...", file=sys.stderr, flush=True)
                url = tooz_url(backend, server, ttl)
                assert url is not None
                r = tooz_cell(python, url, backend, ttl, args.rounds, logs, notes, seed)
                results.append(r)
                if not r.failovers and r.note:  # the driver cannot elect: one row says so
                    break
            else:
                rest = [f"{t:g}" for t in args.ttls if t not in whole]
                if rest:
                    skipped.append(
                        f"tooz {backend} TTL {', '.join(rest)}: not measured: tooz's URL "
                        "timeout (its lock and membership TTL) is whole seconds, 1 at least"
                    )
        finally:
            server.remove()
    elapsed = time.monotonic() - started
    print()
    print(
        f"Leader failover: kill -9 of the leader -> the new leader acts; 3 candidate processes, "
        f"{args.rounds} round(s) per cell, seed {seed}, {elapsed:.0f} s"
    )
    print(table(results))
    print()
    print(
        "expiry->new: median time from the dead leader's lease expiry (its last renewal sent "
        "+ lease) to the new leader's act; elected->write: from podkit's campaign() returning "
        "to the first fenced write. <=1.2x: yes = even the max is within 1.2 x TTL, median = "
        "only the median is, NO = the median is over."
    )
    for line in [*skipped, K8S_NOTE]:
        print(f"- {line}")
    if notes.lines:
        print("anomalies:")
        for line in notes.lines:
            print(f"- {line}")
    print(f"candidate logs: {logs}")


if __name__ == "__main__":
    main()
