"""`podkit lb`: the HTTP load balancer as a component.

    podkit lb --listen 0.0.0.0:8080 \\
        --upstream http://10.0.0.1:8000 --upstream http://10.0.0.2:8000,weight=2 \\
        --policy least-requests --workers 2
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from typing import Annotated, Any

import typer

from podkit.lb.balancer import LoadBalancer
from podkit.lb.features import Features
from podkit.lb.policy import POLICIES, parse_upstream
from podkit.net.listen import LISTEN_HELP, ListenError
from podkit.net.proxy.config import parse_listen, proxy_config
from podkit.net.proxy.engine import ProxyConfig
from podkit.net.proxy.workers import serve


def build_config(
    listen: str,
    upstreams: list[str],
    policy: str = "round-robin",
    hash_on: str | None = None,
    workers: int = 1,
    members: bool = False,
    **options: Any,
) -> ProxyConfig:
    """Check the flags and make the balancer's configuration; ValueError names the bad
    one. With `members` (a membership source is given) no --upstream is needed."""
    parse_listen(listen)
    if not upstreams and not members:
        raise ValueError("at least one --upstream (or a --members-* source) is needed")
    if policy not in POLICIES:
        raise ValueError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if hash_on is not None and policy != "consistent-hash":
        raise ValueError("--hash-on needs --policy consistent-hash")
    if policy == "consistent-hash":
        from podkit.lb.policy import ConsistentHash

        ConsistentHash([], hash_on or "ip")  # validates hash_on
    return proxy_config(
        listen, upstreams, workers=workers, policy=policy, hash_on=hash_on, **options
    )


cli = typer.Typer(help="HTTP load balancer.", no_args_is_help=True)


@cli.callback(invoke_without_command=True)
def lb(
    upstream: Annotated[
        list[str] | None,
        typer.Option(
            help="An upstream, http://HOST:PORT with an optional ,weight=N; repeat for each."
        ),
    ] = None,
    listen: Annotated[str, typer.Option(help=f"Address to serve on: {LISTEN_HELP}")] = (
        "127.0.0.1:8080"
    ),
    policy: Annotated[
        str, typer.Option(help=f"Balancing policy: {', '.join(POLICIES)}.")
    ] = "round-robin",
    hash_on: Annotated[
        str | None,
        typer.Option(help="Key for consistent-hash: header:NAME, cookie:NAME or ip."),
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Worker processes sharing the port (SO_REUSEPORT).")
    ] = 1,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to connect upstream.")] = 2.0,
    upstream_timeout: Annotated[
        float,
        typer.Option(help="Seconds an upstream may stay silent while answering, per try (504)."),
    ] = 60.0,
    request_timeout: Annotated[
        float,
        typer.Option(help="Seconds from a whole request to its answer, all tries (504; 0: none)."),
    ] = 0.0,
    idle_timeout: Annotated[
        float, typer.Option(help="Seconds a keep-alive client may idle between requests.")
    ] = 60.0,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds to receive a request head (408).")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request body may pause while it is read (408).")
    ] = 30.0,
    send_timeout: Annotated[
        float, typer.Option(help="Seconds a client may leave its answer unread (closed).")
    ] = 30.0,
    tries: Annotated[int, typer.Option(help="Attempts per request when retrying is safe.")] = 3,
    reuse_port: Annotated[
        bool,
        typer.Option(
            "--reuse-port/--shared-socket",
            help="Workers bind their own SO_REUSEPORT socket, or share one accept queue.",
        ),
    ] = True,
    health_path: Annotated[
        str | None, typer.Option(help="Active checks: GET this path on every upstream.")
    ] = None,
    health_interval: Annotated[float, typer.Option(help="Seconds between checks.")] = 5.0,
    health_timeout: Annotated[float, typer.Option(help="Seconds a check may take.")] = 1.0,
    healthy_threshold: Annotated[
        int, typer.Option(help="Passes in a row to bring a host back.")
    ] = 2,
    unhealthy_threshold: Annotated[
        int, typer.Option(help="Failures in a row to take a host out.")
    ] = 3,
    passive_health: Annotated[
        bool, typer.Option(help="Outlier ejection even without --health-path.")
    ] = False,
    consecutive_5xx: Annotated[
        int, typer.Option(help="5xx or connect errors in a row that eject a host (0: off).")
    ] = 5,
    ejection_time: Annotated[
        float, typer.Option(help="Seconds of the first ejection; grows with repeats.")
    ] = 30.0,
    max_ejection_percent: Annotated[
        float, typer.Option(help="Most hosts ejected at once, in percent (one always may).")
    ] = 10.0,
    cache_bytes: Annotated[int, typer.Option(help="Response cache size in bytes (0: off).")] = 0,
    cache_entry_bytes: Annotated[
        int, typer.Option(help="Largest answer the cache stores, in bytes.")
    ] = 1 << 20,
    rate_limit: Annotated[
        str | None, typer.Option(help="Per-client rate, e.g. '100/s burst 200'.")
    ] = None,
    rate_limit_by: Annotated[
        str, typer.Option(help="Client key of --rate-limit: ip or header:NAME.")
    ] = "ip",
    global_rate_limit: Annotated[
        str | None, typer.Option(help="One rate for all clients together.")
    ] = None,
    max_connections: Annotated[
        int | None, typer.Option(help="Circuit breaker: connections per upstream.")
    ] = None,
    max_pending: Annotated[
        int | None, typer.Option(help="Circuit breaker: connects in progress per upstream.")
    ] = None,
    max_requests: Annotated[
        int | None, typer.Option(help="Circuit breaker: requests in flight per upstream.")
    ] = None,
    retry_budget: Annotated[
        float | None,
        typer.Option(
            help="Retries of sent requests: at most this percent of the requests of the last "
            "10 s, plus 10 a second (20). Also turns on the breaker's cap on retries in "
            "flight, the same percent of the requests in flight."
        ),
    ] = None,
    tls_cert: Annotated[str | None, typer.Option(help="TLS certificate chain (PEM).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="TLS private key (PEM).")] = None,
    self_signed: Annotated[
        bool, typer.Option(help="Serve TLS with a fresh self-signed certificate.")
    ] = False,
    admin_host: Annotated[str, typer.Option(help="Admin address.")] = "127.0.0.1",
    admin_port: Annotated[
        int | None,
        typer.Option(
            help="Admin port (/metrics, /status, /purge); worker i uses PORT+i, and each "
            "answers /metrics and /purge for all workers."
        ),
    ] = None,
    members_file: Annotated[
        str | None, typer.Option(help="Follow upstreams listed in this file.")
    ] = None,
    members_kv: Annotated[
        str | None, typer.Option(help="Follow upstreams under a KV prefix (backend URL).")
    ] = None,
    members_prefix: Annotated[str | None, typer.Option(help="The KV prefix.")] = None,
    members_dns: Annotated[
        str | None, typer.Option(help="Follow every address of NAME, as NAME:PORT.")
    ] = None,
) -> None:
    """Balance HTTP/1.1 requests over upstreams: keep-alive, streaming, WebSocket."""
    if policy == "round-robin" and hash_on is not None:
        policy = "consistent-hash"
    upstream = upstream or []
    features = Features(
        health_path=health_path,
        health_interval=health_interval,
        health_timeout=health_timeout,
        healthy_threshold=healthy_threshold,
        unhealthy_threshold=unhealthy_threshold,
        passive_health=passive_health,
        consecutive_5xx=consecutive_5xx,
        ejection_time=ejection_time,
        max_ejection_percent=max_ejection_percent,
        cache_bytes=cache_bytes,
        cache_entry_bytes=cache_entry_bytes,
        rate_limit=rate_limit,
        rate_limit_by=rate_limit_by,
        global_rate_limit=global_rate_limit,
        max_connections=max_connections,
        max_pending=max_pending,
        max_requests=max_requests,
        retry_budget=retry_budget,
        tls_cert=tls_cert,
        tls_key=tls_key,
        admin_host=admin_host,
        admin_port=admin_port,
        members_file=members_file,
        members_kv=members_kv,
        members_prefix=members_prefix,
        members_dns=members_dns,
    )
    try:
        if self_signed and tls_cert:
            raise ValueError("--self-signed and --tls-cert exclude each other")
        features.check()
        config = build_config(
            listen,
            upstream,
            policy,
            hash_on,
            workers,
            members=features.members,
            scheme="https" if tls_cert or self_signed else "http",
            connect_timeout=connect_timeout,
            upstream_timeout=upstream_timeout,
            request_timeout=request_timeout,
            idle_timeout=idle_timeout,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            send_timeout=send_timeout,
            tries=tries,
            reuse_port=reuse_port,
            **({} if retry_budget is None else {"retry_percent": retry_budget}),
        )
    except ValueError as exc:
        print(f"podkit lb: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    tls_dir = None
    if self_signed:
        tls_dir = tempfile.mkdtemp(prefix="podkit-lb-tls-")
        from podkit.net.tls import self_signed as make_self_signed

        hosts = ["localhost", "127.0.0.1", *([config.host] if config.host != "0.0.0.0" else [])]
        cert, key = make_self_signed(tls_dir, list(dict.fromkeys(hosts)))
        features.tls_cert, features.tls_key = str(cert), str(key)
    names = ", ".join(parse_upstream(u).name for u in upstream) or "members"

    def ready() -> None:
        print(
            f"lb: listening on {config.host}:{config.port} ({config.workers} worker"
            f"{'s' if config.workers != 1 else ''}, {config.policy}) -> {names}",
            file=sys.stderr,
            flush=True,
        )

    try:
        code = serve(
            config,
            features=features if features != Features() else None,
            ready=ready,
            proxy=LoadBalancer,
        )
    except ListenError as exc:
        print(f"podkit lb: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        if tls_dir is not None:
            shutil.rmtree(tls_dir, ignore_errors=True)
    raise typer.Exit(code)
