"""TLS termination: `podkit sidecar tls` beside nginx's, in front of the same backend.

    flock /tmp/podkit-bench.lock .venv/bin/python benchmarks/tls_sidecar.py
    .venv/bin/python benchmarks/tls_sidecar.py --workers 1 --duration 5

One run starts, on free loopback ports: one static backend (nginx, one worker, a fixed
100-byte body, keep-alive), a self-signed ECDSA P-256 certificate (podkit.net.tls), and in
front of the backend, with the same number of worker processes (1, then 2):
- nginx terminating TLS (`listen ssl`, TLS 1.2/1.3, the same certificate, session cache,
  `proxy_pass` with upstream keep-alive);
- `podkit sidecar tls --workers N` with the same certificate, by default the compiled
  build (`--build compiled`, see setup.py and benchmarks/lb.py; `--build pure` runs the
  interpreted checkout).
wrk -t2 -c64 over HTTPS (keep-alive: the handshakes happen once per connection, as for a
browser or an API client) for `--duration` seconds after a 2 s warm-up, `--rounds` times
in alternating order; the best of each is kept and every run printed.

Goal (issue 4): podkit >= 1.0x nginx's req/s at the same worker count.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lb import (
    BACKEND_CONF,
    BODY,
    NGINX_COMMON,
    ROOT,
    Procs,
    Result,
    fmt_ratio,
    free_port,
    group_cpu_seconds,
    nginx,
    paired,
    podkit_env,
    wait_port,
    wrk,
    wrk_arguments,
)
from podkit.net.tls import self_signed

TLS_CONF = (
    "worker_processes {workers};\n"
    + NGINX_COMMON
    + """
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
        }}
    }}
}}
"""
)


def main() -> None:
    args = wrk_arguments(__doc__, "server").parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="podkit-bench-tls-"))
    procs = Procs(tmp)
    cert, key = self_signed(tmp / "tls", ["localhost", "127.0.0.1"])
    env = podkit_env(tmp, args.build)
    rows: list[tuple[int, str, Result, list[float], list[float]]] = []
    try:
        backend = free_port()
        nginx(procs, "backend", BACKEND_CONF, port=backend, body=BODY.strip() + "\\n")
        wait_port(backend)
        for workers in [int(w) for w in args.workers.split(",")]:
            best: dict[str, Result] = {}
            runs: dict[str, list[float]] = {"nginx": [], "podkit": []}
            cpu_us: dict[str, list[float]] = {"nginx": [], "podkit": []}  # per request
            for rnd in range(args.rounds):
                for kind in ("nginx", "podkit") if rnd % 2 == 0 else ("podkit", "nginx"):
                    port = free_port()
                    if kind == "nginx":
                        pid = nginx(procs, f"nginx-tls-{workers}-{rnd}", TLS_CONF,
                                    workers=workers, port=port, backend=backend,
                                    cert=cert, key=key)  # fmt: skip
                    else:
                        pid = procs.start(
                            f"podkit-tls-{workers}-{rnd}",
                            [str(ROOT / ".venv/bin/podkit"), "sidecar", "tls",
                             "--listen", f"127.0.0.1:{port}",
                             "--upstream", f"127.0.0.1:{backend}", "--cert", str(cert),
                             "--key", str(key), "--workers", str(workers)],
                            env=env,
                        )  # fmt: skip
                    try:
                        wait_port(port)
                        wrk(port, 2, scheme="https")
                        cpu = group_cpu_seconds(pid)
                        r = wrk(port, args.duration, scheme="https")
                        cpu = group_cpu_seconds(pid) - cpu
                    finally:
                        procs.stop(pid)
                    cpu_us[kind].append(cpu / (r.rps * args.duration) * 1e6)
                    runs[kind].append(r.rps)
                    if kind not in best or r.rps > best[kind].rps:
                        best[kind] = r
                    print(f"workers={workers} round {rnd + 1} {kind:6} {r.rps:9.0f} req/s  "
                          f"p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  errors {r.errors}  "
                          f"CPU {cpu_us[kind][-1]:.1f} us/request", flush=True)  # fmt: skip
            for kind in ("nginx", "podkit"):
                rows.append((workers, kind, best[kind], runs[kind], cpu_us[kind]))
    finally:
        procs.stop()
    print(
        "\n| workers | TLS terminator | best req/s | p50 ms | p99 ms | podkit/nginx, best | "
        "podkit/nginx by round: median (range) | every run | CPU us/request, median |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(w, k): r for w, k, r, _, _ in rows}
    every_run = {(w, k): every for w, k, _, every, _ in rows}
    for w, k, r, every, cpu_runs in rows:
        ratio = fmt_ratio(by[(w, "podkit")].rps, r.rps) if k == "nginx" else "-"
        rounds = paired(every_run[(w, "podkit")], every) if k == "nginx" else "-"
        runs_text = ", ".join(f"{x:,.0f}" for x in every)
        cells = [str(w), k, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", ratio, rounds,
                 runs_text, f"{statistics.median(cpu_runs):.1f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(f"\npodkit build: {args.build}; logs in {tmp}")


if __name__ == "__main__":
    main()
