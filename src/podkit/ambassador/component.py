"""`podkit ambassador ...`: ambassador components, one subcommand each.

`podkit ambassador broker` listens on a local port and forwards each connection to an
endpoint of a logical service, found by static list, environment, DNS or a KV registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from podkit.aio import stop_event
from podkit.clihelp import App, epilog
from podkit.net.listen import run_server
from podkit.net.proxy.flags import LISTENING, Listen

if TYPE_CHECKING:
    from podkit.ambassador.broker import Broker, Resolver

DOCS = "docs/single-node.md"
cli = App(
    help="Ambassadors: local proxies in front of remote services.",
    no_args_is_help=True,
    epilog=epilog("podkit ambassador broker --service redis --listen 6379 --env", docs=DOCS),
)
ENDPOINTS = "Endpoints"  # the groups of the ambassadors' options
FAILOVER = "Failover"
ARMS = "Arms and users"
ADMIN = "Admin"


def _log(message: str) -> None:
    print(f"ambassador: {message}", file=sys.stderr, flush=True)


def _split_log(message: str) -> None:
    print(f"ambassador split: {message}", file=sys.stderr, flush=True)


async def _run_broker(broker: Broker, admin_port: int | None) -> int:
    from podkit.net.listen import listening
    from podkit.observe.admin import AdminServer

    admin = None
    try:
        await listening(broker.start(), "--listen", broker.host, broker.port)
        _log(f"listening on {broker.host}:{broker.port}")
        if admin_port is not None:
            admin = AdminServer(
                {
                    "/status": lambda: (200, broker.status()),
                    "/healthz": lambda: (200, {"ok": True}),
                },
                "127.0.0.1",
                admin_port,
            )
            await listening(admin.start(), "--admin-port", admin.host, admin_port)
            _log(f"status on {admin.url}/status")
        stop = stop_event()
        with contextlib.suppress(asyncio.CancelledError):
            await stop.wait()
    finally:
        if admin is not None:
            await admin.close()
        await broker.close()
    return 0


Endpoint = Annotated[
    list[str] | None,
    typer.Option(
        "--endpoint", help="A static endpoint host:port (repeatable).", rich_help_panel=ENDPOINTS
    ),
]
FromEnv = Annotated[
    bool,
    typer.Option(
        "--env/--no-env",
        help="Use <SERVICE>_SERVICE_HOST/_PORT from the environment.",
        rich_help_panel=ENDPOINTS,
    ),
]
PortName = Annotated[
    str | None,
    typer.Option(
        "--port-name",
        help="With --env: read <SERVICE>_SERVICE_PORT_<NAME>.",
        rich_help_panel=ENDPOINTS,
    ),
]
SRVName = Annotated[
    str | None,
    typer.Option(
        "--srv", help="DNS SRV name, e.g. _redis._tcp.cache.example.", rich_help_panel=ENDPOINTS
    ),
]
DNSName = Annotated[
    str | None,
    typer.Option(
        "--dns", help="DNS name:port resolved by A/AAAA records.", rich_help_panel=ENDPOINTS
    ),
]
DNSServer = Annotated[
    str | None,
    typer.Option(
        "--dns-server",
        help="Name server host[:port].",
        show_default="resolv.conf's",
        rich_help_panel=ENDPOINTS,
    ),
]
Registry = Annotated[
    str | None,
    typer.Option(
        "--registry", help="KV backend URL where instances register.", rich_help_panel=ENDPOINTS
    ),
]
RegistryPrefix = Annotated[
    str | None,
    typer.Option(
        "--prefix",
        help="Registry prefix.",
        show_default="services/<service>/",
        rich_help_panel=ENDPOINTS,
    ),
]
Refresh = Annotated[
    float, typer.Option("--refresh", help="Seconds between re-resolves.", rich_help_panel=ENDPOINTS)
]


@cli.command(
    epilog=epilog(
        "podkit ambassador broker --service cache --listen 6379",
        "--srv _redis._tcp.cache.example",
        docs=DOCS,
    )
)
def broker(
    service: Annotated[
        str, typer.Option(help="The logical service name.", rich_help_panel=ENDPOINTS)
    ],
    listen: Annotated[
        int, typer.Option(help="Local port the app connects to.", rich_help_panel=LISTENING)
    ],
    host: Annotated[
        str, typer.Option(help="Local address to listen on.", rich_help_panel=LISTENING)
    ] = "127.0.0.1",
    endpoint: Endpoint = None,
    env: FromEnv = False,
    port_name: PortName = None,
    srv: SRVName = None,
    dns: DNSName = None,
    dns_server: DNSServer = None,
    registry: Registry = None,
    prefix: RegistryPrefix = None,
    refresh: Refresh = 5.0,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to connect upstream.", rich_help_panel=FAILOVER)
    ] = 1.0,
    down_for: Annotated[
        float,
        typer.Option(
            help="Seconds a failed endpoint is skipped (doubles, capped).",
            rich_help_panel=FAILOVER,
        ),
    ] = 1.0,
    max_down_for: Annotated[
        float, typer.Option(help="Cap of --down-for.", rich_help_panel=FAILOVER)
    ] = 30.0,
    admin_port: Annotated[
        int | None,
        typer.Option(help="Loopback port for GET /status and /healthz.", rich_help_panel=ADMIN),
    ] = None,
) -> None:
    """Forward a local port to a service's endpoints: round-robin, failover, re-resolve."""
    from podkit.ambassador.broker import Broker

    resolvers = _resolvers(
        service, endpoint, env, port_name, srv, dns, dns_server, registry, prefix
    )
    b = Broker(
        resolvers,
        host,
        listen,
        refresh=refresh,
        connect_timeout=connect_timeout,
        down_for=down_for,
        max_down_for=max_down_for,
        log=_log,
    )
    raise typer.Exit(run_server(_run_broker(b, admin_port), _log))


def _resolvers(
    service: str,
    endpoint: list[str] | None,
    env: bool,
    port_name: str | None,
    srv: str | None,
    dns: str | None,
    dns_server: str | None,
    registry: str | None,
    prefix: str | None,
) -> list[Resolver]:
    """Where `broker` finds the service's endpoints, as its flags say; a bad endpoint, or
    none given, exits 2 with a line saying so."""
    from podkit.ambassador.broker import (
        DNSResolver,
        EnvResolver,
        KVRegistry,
        StaticResolver,
        parse_endpoint,
    )

    resolvers: list[Resolver] = []
    try:
        if endpoint:
            resolvers.append(StaticResolver([parse_endpoint(e) for e in endpoint]))
        server = None
        if dns_server:
            name, _, port = dns_server.partition(":")
            server = (name, int(port or 53))
        if srv:
            resolvers.append(DNSResolver(srv, server=server))
        if dns:
            name, port_ = parse_endpoint(dns)
            resolvers.append(DNSResolver(name, port_, server=server))
    except ValueError as exc:
        _log(f"bad endpoint: {exc}")
        raise typer.Exit(2) from None
    if env:
        resolvers.append(EnvResolver(service, port_name))
    if registry:
        resolvers.append(KVRegistry(registry, prefix or f"services/{service}/", log=_log))
    if not resolvers:
        _log("no source of endpoints: give --endpoint, --env, --srv, --dns or --registry")
        raise typer.Exit(2)
    return resolvers


# -- split -------------------------------------------------------------------------------


def parse_arm(text: str) -> tuple[str, list[str], float]:
    """'canary=http://10.0.0.2:80+http://10.0.0.3:80,weight=10' -> (name, urls, weight)."""
    name, eq, rest = text.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"--arm {text!r}: expected NAME=URL[+URL...][,weight=W]")
    urls, _, opt = rest.partition(",")
    weight = 1.0
    if opt:
        key, _, value = opt.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if key.strip() != "weight" or weight < 0:
            raise ValueError(f"--arm {text!r}: expected ,weight=W with W >= 0")
    targets = [u.strip() for u in urls.split("+") if u.strip()]
    if not targets:
        raise ValueError(f"--arm {text!r}: no upstream URL")
    return name.strip(), targets, weight


def parse_arms(texts: list[str]) -> list[tuple[str, list[str], float]]:
    """Every --arm parsed, in order; a name given twice is a ValueError naming it."""
    arms: list[tuple[str, list[str], float]] = []
    for text in texts:
        parsed = parse_arm(text)
        if any(parsed[0] == name for name, _, _ in arms):
            raise ValueError(f"--arm {text!r}: arm name {parsed[0]!r} is given twice")
        arms.append(parsed)
    return arms


@cli.command(
    epilog=epilog(
        "podkit ambassador split --sticky cookie:uid",
        "--arm stable=http://10.0.0.1:80,weight=90",
        "--arm canary=http://10.0.0.3:80,weight=10",
        docs=DOCS,
    )
)
def split(
    arm: Annotated[
        list[str],
        typer.Option(
            help="An arm: NAME=URL[+URL...][,weight=W]; repeat; the last is the canary.",
            rich_help_panel=ARMS,
        ),
    ],
    listen: Listen = "127.0.0.1:8000",
    sticky: Annotated[
        str,
        typer.Option(help="Who a user is: header:NAME, cookie:NAME or ip.", rich_help_panel=ARMS),
    ] = "header:X-User",
    experiment: Annotated[
        str, typer.Option(help="Name that salts the user hash.", rich_help_panel=ARMS)
    ] = "default",
    admin_port: Annotated[
        int | None,
        typer.Option(
            help="Loopback port: /status, /metrics, GET/PUT /weights.", rich_help_panel=ADMIN
        ),
    ] = None,
) -> None:
    """Split HTTP traffic over weighted arms, each user sticking to one arm."""
    from podkit.ambassador.split import Splitter, UserKey
    from podkit.net.proxy.upstream import parse_upstream

    try:
        arms = parse_arms(arm)
        names = {n: [parse_upstream(u).name for u in urls] for n, urls, _ in arms}
        splitter = Splitter.from_weights(experiment, {n: w for n, _, w in arms})
        key = UserKey.parse(sticky)
        host, _, port_text = listen.rpartition(":")
        port = int(port_text)
    except ValueError as exc:
        _split_log(str(exc))
        raise typer.Exit(2) from None
    urls = [u for _, us, _ in arms for u in us]
    code = run_server(
        _run_split(splitter, key, names, urls, host or "127.0.0.1", port, admin_port), _split_log
    )
    raise typer.Exit(code)


async def _run_split(
    splitter: object,
    key: object,
    names: dict[str, list[str]],
    urls: list[str],
    host: str,
    port: int,
    admin_port: int | None,
) -> int:
    from podkit.ambassador.split import SplitMetrics, SplitPolicy, Splitter, UserKey, split_admin
    from podkit.net.listen import listening
    from podkit.net.proxy.engine import Proxy, ProxyConfig

    assert isinstance(splitter, Splitter) and isinstance(key, UserKey)
    policy = SplitPolicy(splitter, key, names)
    metrics = SplitMetrics(policy)
    lb = Proxy(
        ProxyConfig(
            upstreams=urls, host=host, port=port, reuse_port=False, name="podkit ambassador split"
        ),
        policy=policy,
        filters=[metrics],
    )
    await listening(lb.start(), "--listen", host, port)
    admin = None
    try:
        arms = ", ".join(f"{a.name} ({a.weight:g})" for a in splitter.arms)
        _split_log(f"splitting {host}:{port} over {arms}")
        if admin_port is not None:
            admin = split_admin(policy, metrics, "127.0.0.1", admin_port, _split_log)
            await listening(admin.start(), "--admin-port", "127.0.0.1", admin_port)
        stop = stop_event()
        await stop.wait()
    finally:
        if admin is not None:
            await admin.close()
        await lb.close()
    return 0
