"""`podkit lb`: the HTTP load balancer as a component.

    podkit lb --listen 0.0.0.0:8080 \\
        --upstream http://10.0.0.1:8000 --upstream http://10.0.0.2:8000,weight=2 \\
        --policy least-requests --workers 2
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import fields
from functools import partial
from typing import Annotated, Any

import typer

from podkit.lb.balancer import LoadBalancer
from podkit.lb.features import Features
from podkit.lb.policy import POLICIES, make_policy, parse_upstream
from podkit.net.listen import ListenError
from podkit.net.proxy.config import parse_listen, proxy_config
from podkit.net.proxy.engine import ProxyConfig
from podkit.net.proxy.flags import (
    BodyTimeout,
    ConnectTimeout,
    HeaderTimeout,
    IdleTimeout,
    Listen,
    RequestTimeout,
    ReusePort,
    SendTimeout,
    Tries,
    UpstreamTimeout,
    Workers,
)
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
    return proxy_config(listen, upstreams, workers=workers, **options)


cli = typer.Typer(help="HTTP load balancer.", no_args_is_help=True)

# -- the balancer's own options (the engine's are in podkit.net.proxy.flags) -------------

Upstreams = Annotated[
    list[str] | None,
    typer.Option(
        "--upstream",
        help="An upstream, http://HOST:PORT with an optional ,weight=N; repeat for each.",
    ),
]
PolicyName = Annotated[
    str, typer.Option("--policy", help=f"Balancing policy: {', '.join(POLICIES)}.")
]
HashOn = Annotated[
    str | None,
    typer.Option("--hash-on", help="Key for consistent-hash: header:NAME, cookie:NAME or ip."),
]
HealthPath = Annotated[
    str | None,
    typer.Option("--health-path", help="Active checks: GET this path on every upstream."),
]
HealthInterval = Annotated[float, typer.Option("--health-interval", help="Seconds between checks.")]
HealthTimeout = Annotated[float, typer.Option("--health-timeout", help="Seconds a check may take.")]
HealthyThreshold = Annotated[
    int, typer.Option("--healthy-threshold", help="Passes in a row to bring a host back.")
]
UnhealthyThreshold = Annotated[
    int, typer.Option("--unhealthy-threshold", help="Failures in a row to take a host out.")
]
PassiveHealth = Annotated[
    bool,
    typer.Option(
        "--passive-health/--no-passive-health",
        help="Outlier ejection even without --health-path.",
    ),
]
Consecutive5xx = Annotated[
    int,
    typer.Option(
        "--consecutive-5xx", help="5xx or connect errors in a row that eject a host (0: off)."
    ),
]
EjectionTime = Annotated[
    float,
    typer.Option("--ejection-time", help="Seconds of the first ejection; grows with repeats."),
]
MaxEjectionPercent = Annotated[
    float,
    typer.Option(
        "--max-ejection-percent", help="Most hosts ejected at once, in percent (one always may)."
    ),
]
CacheBytes = Annotated[
    int, typer.Option("--cache-bytes", help="Response cache size in bytes (0: off).")
]
CacheEntryBytes = Annotated[
    int, typer.Option("--cache-entry-bytes", help="Largest answer the cache stores, in bytes.")
]
RateLimit = Annotated[
    str | None, typer.Option("--rate-limit", help="Per-client rate, e.g. '100/s burst 200'.")
]
RateLimitBy = Annotated[
    str, typer.Option("--rate-limit-by", help="Client key of --rate-limit: ip or header:NAME.")
]
GlobalRateLimit = Annotated[
    str | None, typer.Option("--global-rate-limit", help="One rate for all clients together.")
]
MaxConnections = Annotated[
    int | None,
    typer.Option("--max-connections", help="Circuit breaker: connections per upstream."),
]
MaxPending = Annotated[
    int | None,
    typer.Option("--max-pending", help="Circuit breaker: connects in progress per upstream."),
]
MaxRequests = Annotated[
    int | None,
    typer.Option("--max-requests", help="Circuit breaker: requests in flight per upstream."),
]
RetryBudgetPercent = Annotated[
    float | None,
    typer.Option(
        "--retry-budget",
        help="Retries of sent requests: at most this percent of the requests of the last "
        "10 s, plus 10 a second (20). Also turns on the breaker's cap on retries in "
        "flight, the same percent of the requests in flight.",
    ),
]
TLSCert = Annotated[str | None, typer.Option("--tls-cert", help="TLS certificate chain (PEM).")]
TLSKey = Annotated[str | None, typer.Option("--tls-key", help="TLS private key (PEM).")]
SelfSigned = Annotated[
    bool,
    typer.Option(
        "--self-signed/--no-self-signed", help="Serve TLS with a fresh self-signed certificate."
    ),
]
AdminHost = Annotated[str, typer.Option("--admin-host", help="Admin address.")]
AdminPort = Annotated[
    int | None,
    typer.Option(
        "--admin-port",
        help="Admin port (/metrics, /status, /purge); worker i uses PORT+i, and each "
        "answers /metrics and /purge for all workers.",
    ),
]
MembersFile = Annotated[
    str | None, typer.Option("--members-file", help="Follow upstreams listed in this file.")
]
MembersKV = Annotated[
    str | None,
    typer.Option("--members-kv", help="Follow upstreams under a KV prefix (backend URL)."),
]
MembersPrefix = Annotated[str | None, typer.Option("--members-prefix", help="The KV prefix.")]
MembersDNS = Annotated[
    str | None,
    typer.Option("--members-dns", help="Follow every address of NAME, as NAME:PORT."),
]


@cli.callback(invoke_without_command=True)
def lb(
    upstream: Upstreams = None,
    listen: Listen = "127.0.0.1:8080",
    policy: PolicyName = "round-robin",
    hash_on: HashOn = None,
    workers: Workers = 1,
    connect_timeout: ConnectTimeout = 2.0,
    upstream_timeout: UpstreamTimeout = 60.0,
    request_timeout: RequestTimeout = 0.0,
    idle_timeout: IdleTimeout = 60.0,
    header_timeout: HeaderTimeout = 10.0,
    body_timeout: BodyTimeout = 30.0,
    send_timeout: SendTimeout = 30.0,
    tries: Tries = 3,
    reuse_port: ReusePort = True,
    health_path: HealthPath = None,
    health_interval: HealthInterval = 5.0,
    health_timeout: HealthTimeout = 1.0,
    healthy_threshold: HealthyThreshold = 2,
    unhealthy_threshold: UnhealthyThreshold = 3,
    passive_health: PassiveHealth = False,
    consecutive_5xx: Consecutive5xx = 5,
    ejection_time: EjectionTime = 30.0,
    max_ejection_percent: MaxEjectionPercent = 10.0,
    cache_bytes: CacheBytes = 0,
    cache_entry_bytes: CacheEntryBytes = 1 << 20,
    rate_limit: RateLimit = None,
    rate_limit_by: RateLimitBy = "ip",
    global_rate_limit: GlobalRateLimit = None,
    max_connections: MaxConnections = None,
    max_pending: MaxPending = None,
    max_requests: MaxRequests = None,
    retry_budget: RetryBudgetPercent = None,
    tls_cert: TLSCert = None,
    tls_key: TLSKey = None,
    self_signed: SelfSigned = False,
    admin_host: AdminHost = "127.0.0.1",
    admin_port: AdminPort = None,
    members_file: MembersFile = None,
    members_kv: MembersKV = None,
    members_prefix: MembersPrefix = None,
    members_dns: MembersDNS = None,
) -> None:
    """Balance HTTP/1.1 requests over upstreams: keep-alive, streaming, WebSocket."""
    _run(**locals())  # every flag, by its parameter name


def _run(
    upstream: list[str] | None,
    listen: str,
    policy: str,
    hash_on: str | None,
    workers: int,
    self_signed: bool,
    **flags: Any,
) -> None:
    """Serve as `lb`'s flags say until stopped: the feature flags (the fields of
    `Features`) make its Features, the others are the engine's options. A bad flag exits
    2 with a line naming it, an address in use 1."""
    if policy == "round-robin" and hash_on is not None:
        policy = "consistent-hash"
    upstream = upstream or []
    feature_flags = {f.name for f in fields(Features)}
    features = Features(**{k: v for k, v in flags.items() if k in feature_flags})
    engine = {k: v for k, v in flags.items() if k not in feature_flags}
    if features.retry_budget is not None:
        engine["retry_percent"] = features.retry_budget
    try:
        if self_signed and features.tls_cert:
            raise ValueError("--self-signed and --tls-cert exclude each other")
        features.check()
        config = build_config(
            listen,
            upstream,
            policy,
            hash_on,
            workers,
            members=features.members,
            scheme="https" if features.tls_cert or self_signed else "http",
            **engine,
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
    # the policy in effect: round-robin over weighted upstreams is the weighted one
    policy = make_policy(policy, [parse_upstream(u) for u in upstream], hash_on).name

    def ready() -> None:
        print(
            f"lb: listening on {config.host}:{config.port} ({config.workers} worker"
            f"{'s' if config.workers != 1 else ''}, {policy}) -> {names}",
            file=sys.stderr,
            flush=True,
        )

    try:
        code = serve(
            config,
            features=features if features != Features() else None,
            ready=ready,
            proxy=partial(LoadBalancer, policy_name=policy, hash_on=hash_on),
        )
    except ListenError as exc:
        print(f"podkit lb: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        if tls_dir is not None:
            shutil.rmtree(tls_dir, ignore_errors=True)
    raise typer.Exit(code)
