"""HTTP load balancing: `podkit lb` beside nginx and an aiohttp reverse proxy, driven by wrk.

    flock /tmp/podkit-bench.lock .venv/bin/python benchmarks/lb.py
    .venv/bin/python benchmarks/lb.py --workers 1 --duration 5 --proxies podkit,nginx

One run starts, on free loopback ports:
- three identical static backends: nginx 1.22 (Debian's binary), one worker process each,
  answering every path with a fixed 100-byte body (`return 200`), keep-alive;
- the proxies over those three backends, round-robin, each with the same number of
  worker processes (1, then 2):
  - nginx (`proxy_pass` to an `upstream` block with `keepalive 64`, HTTP/1.1 upstream,
    `Connection ""`, access log off, config generated here),
  - `podkit lb --policy round-robin --workers N`, by default the compiled build
    (`--build compiled`: `PODKIT_COMPILE=1`, see setup.py, built here into the run's
    directory, about 20 s) as a deployment would install it; `--build pure` runs the
    editable, interpreted checkout,
  - a plain aiohttp reverse proxy under uvloop (one ClientSession with a keep-alive
    connector; N processes sharing the port with reuse_port), the usual Python choice;
- wrk -t2 -c64 for `--duration` seconds against each (keep-alive), after a 2 s warm-up,
  `--rounds` times (default 2) in alternating order; the best run of each is kept, every
  run is printed (other jobs on a shared machine come in bursts), and the median over
  rounds of podkit's rate over each other proxy's rate in the same round.

Then the added latency: each of nginx and podkit, and one backend directly, is driven at
half of podkit's max rate of that worker count. wrk has no rate option (wrk2 is not
installed), so a Lua `delay()` hook paces it: each of the 64 connections waits
64/rate seconds after every response (in whole milliseconds, rounded up or down at random
to keep the mean), which makes an open-ish, steady load; the latency wrk reports is from
the write of a request to its response. Added p99 = p99 through the proxy - p99 direct.

Printed: req/s, p50 and p99 at full load, the ratios podkit/nginx and podkit/aiohttp,
and the paced p99s. Goals (issue 5): podkit >= 1.0x nginx at each worker count,
>= 4x aiohttp, added p99 <= 1 ms at half load. Everything shares the machine's cores;
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
BODY = "x" * 99 + "\n"  # 100 bytes
CONNECTIONS = 64
THREADS = 2

NGINX_COMMON = """
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
"""

BACKEND_CONF = (
    "worker_processes 1;\n"
    + NGINX_COMMON
    + """
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type text/plain;
        location / {{ return 200 "{body}"; }}
    }}
}}
"""
)

PROXY_CONF = (
    "worker_processes {workers};\n"
    + NGINX_COMMON
    + """
    upstream backends {{
{servers}
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering on;
        }}
    }}
}}
"""
)

AIOHTTP_PROXY = r"""
import asyncio, itertools, os, sys
import aiohttp, uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
       "transfer-encoding", "upgrade", "content-length", "content-encoding"}

def main(port, upstreams, workers):
    cycle = itertools.cycle(upstreams)

    async def on_startup(app):
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            auto_decompress=False)

    async def on_cleanup(app):
        await app["session"].close()

    async def handle(request):
        url = next(cycle) + request.path_qs
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["X-Forwarded-For"] = request.remote or ""
        body = await request.read()
        async with request.app["session"].request(
                request.method, url, headers=headers, data=body or None,
                allow_redirects=False) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
            return web.Response(body=data, status=resp.status, headers=out)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, reuse_port=True, access_log=None,
                print=None, loop=uvloop.new_event_loop())

if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    ups = sys.argv[3:]
    for _ in range(workers - 1):
        if os.fork() == 0:
            break
    main(port, ups, workers)
"""

PACE_LUA = """
local ms = tonumber(os.getenv("PACE_MS"))
local base = math.floor(ms)
local frac = ms - base
function delay()
  if math.random() < frac then return base + 1 end
  return base
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def build_compiled(dest: Path) -> list[str]:
    """Build this checkout with `PODKIT_COMPILE=1` (setup.py) into `dest` (pip --target),
    from a copy beside it, so that the checkout gets no build files; the names of the
    compiled modules. RuntimeError with pip's output when the build fails."""
    src = dest.parent / f"{dest.name}-src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "*.so"))
    done = subprocess.run(
        [PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(dest), str(src)],
        env={**os.environ, "PODKIT_COMPILE": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise RuntimeError(f"the compiled build failed:\n{output}")
    return sorted(p.name.split(".")[0] for p in (dest / "podkit").rglob("*.so"))


def podkit_env(tmp: Path, build: str) -> dict[str, str]:
    """The environment `podkit` runs in: with `build` "compiled", a `PODKIT_COMPILE=1`
    build of this checkout goes into `tmp` and comes first on PYTHONPATH."""
    env = dict(os.environ)
    if build == "pure":
        return env
    dest = tmp / "podkit-compiled"
    print(f"building the compiled podkit into {dest} ...", flush=True)
    print(f"compiled modules: {', '.join(build_compiled(dest))}", flush=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest), env.get("PYTHONPATH")]))
    return env


class Procs:
    """Processes started here, stopped by their own group id at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.procs.append(p)
        return p.pid

    def stop(self, pid: int | None = None) -> None:
        for p in list(self.procs):
            if pid is not None and p.pid != pid:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            self.procs.remove(p)


def group_cpu_seconds(pgid: int) -> float:
    """User plus system CPU seconds used so far by the live processes of group `pgid`
    (a process `Procs.start` started leads its own group, its workers in it)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        if int(fields[2]) == pgid:  # field 5: the process group
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def nginx(procs: Procs, name: str, template: str, **values: object) -> int:
    d = procs.tmp / name
    d.mkdir(exist_ok=True)
    (d / "nginx.conf").write_text(template.format(d=d, **values))
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    return procs.start(
        name,
        [nginx_bin, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log"),
         "-g", "daemon off;"],
    )  # fmt: skip


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        raise ValueError(f"cannot read wrk latency {value!r}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]
    return float(m.group(1)) * scale


def wrk(
    port: int,
    duration: float,
    script: Path | None = None,
    pace_ms: float = 0,
    scheme: str = "http",
) -> Result:
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration:g}s", "--latency"]
    env = dict(os.environ)
    if script is not None:
        cmd += ["-s", str(script)]
        env["PACE_MS"] = f"{pace_ms:.4f}"
    cmd.append(f"{scheme}://127.0.0.1:{port}/")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return Result(rps, p50, p99, errors)


@contextlib.contextmanager
def proxy(
    procs: Procs, kind: str, workers: int, backends: list[int], env: dict[str, str] | None = None
) -> Iterator[int]:
    port = free_port()
    if kind == "nginx":
        servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
        pid = nginx(
            procs, f"nginx-proxy-{workers}", PROXY_CONF, workers=workers, servers=servers, port=port
        )
    elif kind == "podkit":
        ups: list[str] = []
        for p in backends:
            ups += ["--upstream", f"http://127.0.0.1:{p}"]
        pid = procs.start(
            f"podkit-{workers}",
            [str(ROOT / ".venv/bin/podkit"), "lb", "--listen", f"127.0.0.1:{port}",
             "--workers", str(workers), "--policy", "round-robin", *ups],
            env=env,
        )  # fmt: skip
    elif kind == "aiohttp":
        script = procs.tmp / "aiohttp_proxy.py"
        script.write_text(AIOHTTP_PROXY)
        pid = procs.start(
            f"aiohttp-{workers}",
            [PY, str(script), str(port), str(workers),
             *[f"http://127.0.0.1:{p}" for p in backends]],
        )  # fmt: skip
    else:
        raise ValueError(kind)
    try:
        wait_port(port)
        time.sleep(0.3)
        yield port
    finally:
        procs.stop(pid)


def paired(podkit_runs: list[float], other_runs: list[float]) -> str:
    """The median of podkit/other over rounds (each round runs both back to back, so a
    slow spell of the shared machine hits both), with the range."""
    ratios = sorted(a / b for a, b in zip(podkit_runs, other_runs, strict=True) if b > 0)
    if not ratios:
        return "-"
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return f"{median:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def wrk_arguments(doc: str | None, each: str) -> argparse.ArgumentParser:
    """The flags this benchmark and tls_sidecar.py share; `each` is what a round runs."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="worker counts to run (default 1,2)")
    ap.add_argument(
        "--duration", type=float, default=10.0, help="seconds per wrk run (default %(default)s)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help=f"runs per {each} (default %(default)s); the best is kept",
    )
    ap.add_argument(
        "--build", choices=("compiled", "pure"), default="compiled", help="default %(default)s"
    )
    return ap


def main() -> None:
    ap = wrk_arguments(__doc__, "proxy")
    ap.add_argument("--proxies", default="nginx,podkit,aiohttp", help="default %(default)s")
    ap.add_argument("--no-paced", action="store_true", help="skip the half-load latency runs")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    kinds = [k.strip() for k in args.proxies.split(",") if k.strip()]
    counts = [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="podkit-bench-lb-"))
    procs = Procs(tmp)
    (tmp / "pace.lua").write_text(PACE_LUA)
    env = podkit_env(tmp, args.build) if "podkit" in kinds else None
    rows: list[tuple[int, str, Result]] = []
    paced: list[tuple[int, str, float, Result]] = []
    all_runs: dict[tuple[int, str], list[float]] = {}
    try:
        backends = [free_port() for _ in range(3)]
        for i, port in enumerate(backends):
            nginx(procs, f"backend{i}", BACKEND_CONF, port=port, body=BODY.strip() + "\\n")
        for port in backends:
            wait_port(port)
        for workers in counts:
            results: dict[str, Result] = {}
            runs: dict[str, list[float]] = {k: [] for k in kinds}
            for rnd in range(args.rounds):
                # alternate the order, so a burst of outside load does not hit one proxy
                for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                    with proxy(procs, kind, workers, backends, env) as port:
                        wrk(port, 2)  # warm-up: pools filled, caches hot
                        r = wrk(port, args.duration)
                    runs[kind].append(r.rps)
                    if kind not in results or r.rps > results[kind].rps:
                        results[kind] = r
                    print(
                        f"workers={workers} round {rnd + 1} {kind:8} {r.rps:9.0f} req/s"
                        f"  p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  errors {r.errors}",
                        flush=True,
                    )
            for kind in kinds:
                rows.append((workers, kind, results[kind]))
                all_runs[(workers, kind)] = runs[kind]
            if args.no_paced or "podkit" not in results:
                continue
            rate = results["podkit"].rps / 2
            pace_ms = CONNECTIONS / rate * 1000
            r = wrk(backends[0], args.duration, tmp / "pace.lua", pace_ms)
            paced.append((workers, "direct", rate, r))
            for kind in [k for k in ("podkit", "nginx") if k in kinds]:
                with proxy(procs, kind, workers, backends, env) as port:
                    wrk(port, 2)
                    r = wrk(port, args.duration, tmp / "pace.lua", pace_ms)
                paced.append((workers, kind, rate, r))
            for w, kind, _, r in paced[-3:]:
                print(
                    f"workers={w} paced {kind:8} {r.rps:8.0f} req/s  p50 {r.p50_ms:.2f} ms"
                    f"  p99 {r.p99_ms:.2f} ms",
                    flush=True,
                )
    finally:
        procs.stop()
    print()
    print(
        "| workers | proxy | best req/s | p50 ms | p99 ms | podkit/this, best | "
        "podkit/this by round: median (range) | every run |"
    )
    print("|---|---|---|---|---|---|---|---|")
    by = {(w, k): r for w, k, r in rows}
    for w, k, r in rows:
        pk = by.get((w, "podkit"))
        ratio = fmt_ratio(pk.rps, r.rps) if pk and k != "podkit" else "-"
        rounds = paired(all_runs[(w, "podkit")], all_runs[(w, k)]) if ratio != "-" else "-"
        every = ", ".join(f"{x:,.0f}" for x in all_runs[(w, k)])
        print(
            f"| {w} | {k} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {ratio} | {rounds}"
            f" | {every} |"
        )
    if paced:
        print()
        print("| workers | paced at | target | achieved req/s | p50 ms | p99 ms | added p99 ms |")
        print("|---|---|---|---|---|---|---|")
        direct = {w: r for w, k, _, r in paced if k == "direct"}
        for w, k, rate, r in paced:
            added = "-" if k == "direct" else f"{r.p99_ms - direct[w].p99_ms:+.2f}"
            print(
                f"| {w} | {rate:,.0f} | {k} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f}"
                f" | {added} |"
            )
    print(f"\npodkit build: {args.build}; logs in {tmp}")


if __name__ == "__main__":
    main()
