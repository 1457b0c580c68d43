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

from podkit.clihelp import App, epilog
from podkit.lb.balancer import LoadBalancer
from podkit.lb.features import Features
from podkit.lb.policy import POLICIES, make_policy, parse_upstream
from podkit.net.listen import ListenError
from podkit.net.proxy.config import parse_listen, proxy_config
from podkit.net.proxy.engine import ProxyConfig
from podkit.net.proxy.flags import (
    TIMEOUTS,
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


cli = App()

# -- the balancer's own options (the engine's are in podkit.net.proxy.flags) -------------

UPSTREAMS = "Upstreams and membership"  # the groups of `podkit lb --help`
HEALTH = "Health checks"
CACHE = "Cache"
RATES = "Rate limits"
BREAKER = "Circuit breaking"
TLS = "TLS"
ADMIN = "Admin"

Upstreams = Annotated[
    list[str] | None,
    typer.Option(
        "--upstream",
        help="[http://]HOST:PORT[,weight=N]; repeat for each.",
        rich_help_panel=UPSTREAMS,
    ),
]
PolicyName = Annotated[
    str,
    typer.Option("--policy", help=f"{', '.join(POLICIES)}.", rich_help_panel=UPSTREAMS),
]
HashOn = Annotated[
    str | None,
    typer.Option(
        "--hash-on",
        help="Key: header:NAME, cookie:NAME or ip.",
        show_default="ip",
        rich_help_panel=UPSTREAMS,
    ),
]
HealthPath = Annotated[
    str | None,
    typer.Option(
        "--health-path",
        help="Active checks: GET this path on each upstream.",
        rich_help_panel=HEALTH,
    ),
]
HealthInterval = Annotated[
    float,
    typer.Option("--health-interval", help="Seconds between checks.", rich_help_panel=HEALTH),
]
HealthTimeout = Annotated[
    float,
    typer.Option("--health-timeout", help="Seconds a check may take.", rich_help_panel=HEALTH),
]
HealthyThreshold = Annotated[
    int,
    typer.Option(
        "--healthy-threshold", help="Passes in a row to bring a host back.", rich_help_panel=HEALTH
    ),
]
UnhealthyThreshold = Annotated[
    int,
    typer.Option(
        "--unhealthy-threshold",
        help="Failures in a row to take a host out.",
        rich_help_panel=HEALTH,
    ),
]
PassiveHealth = Annotated[
    bool,
    typer.Option(
        "--passive-health/--no-passive-health",
        help="Eject outliers, even with no checks.",
        rich_help_panel=HEALTH,
    ),
]
Consecutive5xx = Annotated[
    int,
    typer.Option(
        "--consecutive-5xx",
        help="Errors in a row that eject (0: off).",
        rich_help_panel=HEALTH,
    ),
]
EjectionTime = Annotated[
    float,
    typer.Option(
        "--ejection-time",
        help="Seconds of a first ejection (grows).",
        rich_help_panel=HEALTH,
    ),
]
MaxEjectionPercent = Annotated[
    float,
    typer.Option(
        "--max-ejection-percent",
        help="Percent of hosts ejected at once.",
        rich_help_panel=HEALTH,
    ),
]
CacheBytes = Annotated[
    int,
    typer.Option(
        "--cache-bytes", help="Response cache size in bytes (0: off).", rich_help_panel=CACHE
    ),
]
CacheEntryBytes = Annotated[
    int,
    typer.Option(
        "--cache-entry-bytes", help="Largest answer cached, in bytes.", rich_help_panel=CACHE
    ),
]
RateLimit = Annotated[
    str | None,
    typer.Option("--rate-limit", help="Per client, e.g. '100/s burst 200'.", rich_help_panel=RATES),
]
RateLimitBy = Annotated[
    str,
    typer.Option(
        "--rate-limit-by", help="Who a client is: ip or header:NAME.", rich_help_panel=RATES
    ),
]
GlobalRateLimit = Annotated[
    str | None,
    typer.Option(
        "--global-rate-limit", help="One rate for all clients together.", rich_help_panel=RATES
    ),
]
MaxConnections = Annotated[
    int | None,
    typer.Option(
        "--max-connections",
        help="Connections per upstream.",
        show_default="no limit",
        rich_help_panel=BREAKER,
    ),
]
MaxPending = Annotated[
    int | None,
    typer.Option(
        "--max-pending",
        help="Connects under way per upstream.",
        show_default="no limit",
        rich_help_panel=BREAKER,
    ),
]
MaxRequests = Annotated[
    int | None,
    typer.Option(
        "--max-requests",
        help="Requests in flight per upstream.",
        show_default="no limit",
        rich_help_panel=BREAKER,
    ),
]
RetryBudgetPercent = Annotated[
    float | None,
    typer.Option(
        "--retry-budget",
        help="Retries: % of the last 10 s' requests, +10/s; given, also caps retries in flight.",
        show_default="20, no cap",
        rich_help_panel=TIMEOUTS,
    ),
]
TLSCert = Annotated[
    str | None,
    typer.Option(
        "--tls-cert", help="Serve HTTPS with this certificate chain (PEM).", rich_help_panel=TLS
    ),
]
TLSKey = Annotated[
    str | None, typer.Option("--tls-key", help="Private key (PEM).", rich_help_panel=TLS)
]
SelfSigned = Annotated[
    bool,
    typer.Option(
        "--self-signed/--no-self-signed",
        help="Serve TLS with a self-signed cert.",
        rich_help_panel=TLS,
    ),
]
AdminHost = Annotated[
    str, typer.Option("--admin-host", help="Admin address.", rich_help_panel=ADMIN)
]
AdminPort = Annotated[
    int | None,
    typer.Option(
        "--admin-port",
        help="Port of /metrics, /status, /purge; worker i: +i.",
        rich_help_panel=ADMIN,
    ),
]
MembersFile = Annotated[
    str | None,
    typer.Option(
        "--members-file",
        help="Follow the upstreams listed in this file.",
        rich_help_panel=UPSTREAMS,
    ),
]
MembersKV = Annotated[
    str | None,
    typer.Option(
        "--members-kv",
        help="Follow the upstreams under a KV backend URL.",
        rich_help_panel=UPSTREAMS,
    ),
]
MembersPrefix = Annotated[
    str | None,
    typer.Option(
        "--members-prefix", help="The KV prefix of --members-kv.", rich_help_panel=UPSTREAMS
    ),
]
MembersDNS = Annotated[
    str | None,
    typer.Option(
        "--members-dns",
        help="Follow every address of a DNS NAME:PORT.",
        rich_help_panel=UPSTREAMS,
    ),
]


@cli.command(
    "lb",
    no_args_is_help=True,
    epilog=epilog(
        "podkit lb --upstream 10.0.0.1:8000 --upstream 10.0.0.2:8000,weight=2",
        docs="docs/lb.md",
    ),
)
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
