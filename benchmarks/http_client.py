"""HTTP client: podkit.net.client.HTTPClient beside aiohttp's and httpx's, one process each.

    flock /tmp/podkit-bench.lock .venv/bin/python benchmarks/http_client.py
    .venv/bin/python benchmarks/http_client.py --duration 5 --concurrency 16,64

One static backend (nginx, 2 workers, a fixed 100-byte body, keep-alive) on a free
loopback port. Each client runs in a process of its own under uvloop, with `concurrency`
tasks each sending GETs in a loop on keep-alive connections for `duration` seconds
after a 1 s warm-up, `--rounds` times in alternating order; the best run is kept and
every run printed. aiohttp comes with podkit's dev extra (one ClientSession, its default
pool raised to the concurrency); httpx runs from its own venv (benchmarks/.venvs/httpx,
made on first use; one AsyncClient, its pool raised the same way).

Goal (the architecture issue): podkit >= 3x aiohttp's requests/s per process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lb import BACKEND_CONF, BODY, Procs, free_port, nginx, wait_port

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venvs" / "httpx"
CLIENTS = ["podkit", "aiohttp", "httpx"]
GOAL = 3.0  # podkit / aiohttp


async def drive(kind: str, url: str, duration: float, concurrency: int) -> dict[str, float]:
    """Requests/s of one client: `concurrency` tasks in a loop for `duration` s."""
    count = 0
    errors = 0
    stop_at = 0.0

    if kind == "podkit":
        from podkit.net.client import HTTPClient

        client = HTTPClient(max_idle=concurrency)

        async def one() -> int:
            r = await client.request("GET", url)
            return r.status

        async def close() -> None:
            await client.close()

    elif kind == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))

        async def one() -> int:
            async with session.get(url) as r:
                await r.read()
                return r.status

        async def close() -> None:
            await session.close()

    else:
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        hclient = httpx.AsyncClient(limits=limits)

        async def one() -> int:
            r = await hclient.get(url)
            return r.status_code

        async def close() -> None:
            await hclient.aclose()

    async def loop() -> None:
        nonlocal count, errors
        while time.monotonic() < stop_at:
            try:
                status = await one()
            except Exception:
                errors += 1
                continue
            if status == 200:
                count += 1
            else:
                errors += 1

    stop_at = time.monotonic() + 1.0  # warm-up
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    count = errors = 0
    started = time.monotonic()
    stop_at = started + duration
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    await close()
    return {"rps": count / elapsed, "errors": errors}


def python_of(kind: str) -> str:
    if kind != "httpx":
        return sys.executable
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import httpx, uvloop"]
    if not (python.exists() and subprocess.run(check, capture_output=True).returncode == 0):
        print(f"making {VENV} with httpx and uvloop ...", file=sys.stderr, flush=True)
        base = shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "httpx", "uvloop"], check=True)
    return str(python)


def run_client(kind: str, url: str, duration: float, concurrency: int) -> dict[str, float]:
    code = (
        "import asyncio, json, sys, uvloop\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from http_client import drive\n"
        "out = uvloop.run(drive(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [python_of(kind), "-c", code, kind, url, str(duration), str(concurrency)],
        capture_output=True, text=True, timeout=duration + 60,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--concurrency", default="16,64", help="tasks per client (default 16,64)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per client (default 2)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="podkit-bench-client-"))
    procs = Procs(tmp)
    try:
        port = free_port()
        conf = BACKEND_CONF.replace("worker_processes 1;", "worker_processes 2;")
        nginx(procs, "backend", conf, port=port, body=BODY.strip() + "\\n")
        wait_port(port)
        url = f"http://127.0.0.1:{port}/x"
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            runs: dict[str, list[float]] = {k: [] for k in CLIENTS}
            for r in range(args.rounds):
                order = CLIENTS if r % 2 == 0 else CLIENTS[::-1]
                for kind in order:
                    got = run_client(kind, url, args.duration, c)
                    runs[kind].append(got["rps"])
                    print(f"concurrency={c} round {r + 1} {kind:8} {got['rps']:9.0f} req/s"
                          f"  errors {got['errors']:.0f}", flush=True)  # fmt: skip
            best = {k: max(v) for k, v in runs.items()}
            rows.append((c, best, runs))
        print("\n| concurrency | client | best req/s | podkit/this | every run |")
        print("|---|---|---|---|---|")
        for c, best, runs in rows:
            for kind in CLIENTS:
                ratio = "-" if kind == "podkit" else f"{best['podkit'] / best[kind]:.2f}x"
                every = ", ".join(f"{x:,.0f}" for x in runs[kind])
                print(f"| {c} | {kind} | {best[kind]:,.0f} | {ratio} | {every} |")
        worst = min(best["podkit"] / best["aiohttp"] for _, best, _ in rows)
        print(f"\ngoal podkit >= {GOAL}x aiohttp: {'met' if worst >= GOAL else 'not met'}"
              f" (lowest {worst:.2f}x)")  # fmt: skip
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
