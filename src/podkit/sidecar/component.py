"""`podkit sidecar ...`: sidecar components, one subcommand each.

`podkit sidecar config` keeps a config file in sync with a source (a file, an HTTP URL,
a key of a KV backend), writes it atomically, validates it, and tells the app.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from podkit.aio import stop_event
from podkit.clihelp import App, epilog
from podkit.net.listen import LISTEN_HELP, run_server
from podkit.net.proxy.flags import LISTENING, IdleTimeout, Workers

if TYPE_CHECKING:
    from podkit.sidecar.config import ConfigSync, Notifier

DOCS = "docs/single-node.md"
cli = App(
    help="Sidecars: containers that extend an app beside it.",
    no_args_is_help=True,
    epilog=epilog("podkit sidecar tls --upstream 8080 --self-signed", docs=DOCS),
)
SOURCE = "Source"  # the groups of the sidecars' options
NOTIFY = "Validate and notify"
TLS = "TLS"
ADMIN = "Admin"


def _log(message: str) -> None:
    print(f"sidecar: {message}", file=sys.stderr, flush=True)


def _tls_log(message: str) -> None:
    print(f"sidecar tls: {message}", file=sys.stderr, flush=True)


async def _run_config(sync: ConfigSync, admin_port: int | None, once: bool) -> int:
    from podkit.aio import stop_task
    from podkit.net.listen import ListenError, listening
    from podkit.observe.admin import AdminServer
    from podkit.sidecar.config import SourceError

    if once:
        try:
            await sync.sync_once()
        except SourceError as exc:
            _log(str(exc))
            return 1
        finally:
            await sync.close()
        return 0 if sync.status.rejected == 0 else 1
    admin = None
    if admin_port is not None:
        admin = AdminServer(
            {
                "/status": lambda: (200, sync.status.as_dict()),
                "/healthz": lambda: (200, {"ok": True}),
            },
            "127.0.0.1",
            admin_port,
        )
        try:
            await listening(admin.start(), "--admin-port", admin.host, admin_port)
        except ListenError:
            await sync.close()
            raise
        _log(f"status on {admin.url}/status")
    stop = stop_event()
    task = asyncio.create_task(sync.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    await stop_task(task)
    if admin is not None:
        await admin.close()
    await sync.close()
    return 0


ValidateCommand = Annotated[
    str | None,
    typer.Option(
        "--validate",
        help="Command run on the candidate ({} or last arg); non-zero rejects it.",
        rich_help_panel=NOTIFY,
    ),
]
NotifySignal = Annotated[
    str | None,
    typer.Option("--signal", help="Signal sent after a change, e.g. HUP.", rich_help_panel=NOTIFY),
]
PidFile = Annotated[
    Path | None,
    typer.Option(
        "--pid-file", help="File holding the PID that --signal goes to.", rich_help_panel=NOTIFY
    ),
]
ReloadURL = Annotated[
    str | None,
    typer.Option(
        "--reload-url",
        help="URL requested after a change (2xx is success).",
        rich_help_panel=NOTIFY,
    ),
]
ReloadMethod = Annotated[
    str,
    typer.Option("--reload-method", help="POST or GET for --reload-url.", rich_help_panel=NOTIFY),
]
OnChange = Annotated[
    str | None,
    typer.Option(
        "--on-change",
        help="Command run after a change (PODKIT_CONFIG_PATH/_VERSION set).",
        rich_help_panel=NOTIFY,
    ),
]


@cli.command(
    epilog=epilog(
        "podkit sidecar config --source http://config/app.yaml",
        "--path /etc/app/app.yaml --signal HUP --pid-file /run/app.pid",
        docs=DOCS,
    )
)
def config(
    source: Annotated[
        str,
        typer.Option(
            help="A file path (or file://), an http(s):// URL, or a KV backend URL with --key.",
            rich_help_panel=SOURCE,
        ),
    ],
    path: Annotated[
        Path, typer.Option(help="The config file to keep in sync.", rich_help_panel=SOURCE)
    ],
    key: Annotated[
        str | None,
        typer.Option(help="The key, when the source is a KV URL.", rich_help_panel=SOURCE),
    ] = None,
    interval: Annotated[
        float,
        typer.Option(
            help="Seconds between polls of a file or URL (KV is watched).", rich_help_panel=SOURCE
        ),
    ] = 0.5,
    validate: ValidateCommand = None,
    signal_: NotifySignal = None,
    pid_file: PidFile = None,
    reload_url: ReloadURL = None,
    reload_method: ReloadMethod = "POST",
    on_change: OnChange = None,
    max_backoff: Annotated[
        float,
        typer.Option(
            help="Longest wait between retries of a failing source.", rich_help_panel=SOURCE
        ),
    ] = 10.0,
    admin_port: Annotated[
        int | None,
        typer.Option(help="Loopback port for GET /status and /healthz.", rich_help_panel=ADMIN),
    ] = None,
    once: Annotated[
        bool,
        typer.Option(help="Sync once and exit (an init container).", rich_help_panel=SOURCE),
    ] = False,
) -> None:
    """Keep --path equal to --source; validate, swap atomically, then notify the app."""
    from podkit.sidecar.config import Backoff, ConfigSync, open_source

    notifiers = _notifiers(signal_, pid_file, reload_url, reload_method, on_change)
    try:
        src = open_source(source, key, interval)
    except ValueError as exc:
        _log(str(exc))
        raise typer.Exit(2) from None
    if not path.parent.is_dir():
        _log(f"--path {path}: directory {path.parent} does not exist")
        raise typer.Exit(2)
    sync = ConfigSync(
        src,
        path,
        validate=shlex.split(validate) if validate else None,
        notifiers=notifiers,
        backoff=Backoff(maximum=max_backoff),
    )
    raise typer.Exit(run_server(_run_config(sync, admin_port, once), _log))


def _notifiers(
    signal_: str | None,
    pid_file: Path | None,
    reload_url: str | None,
    reload_method: str,
    on_change: str | None,
) -> list[Notifier]:
    """How `config` tells the app of a change, as its flags say; a bad flag exits 2 with
    a line naming it."""
    from podkit.sidecar.config import CommandNotifier, HTTPNotifier, SignalNotifier

    notifiers: list[Notifier] = []
    if signal_ is not None or pid_file is not None:
        if signal_ is None or pid_file is None:
            _log("--signal and --pid-file go together")
            raise typer.Exit(2)
        name = signal_.upper().removeprefix("SIG")
        try:
            sig = signal.Signals[f"SIG{name}"]
        except KeyError:
            _log(f"--signal {signal_!r}: not a signal name (e.g. HUP, USR1)")
            raise typer.Exit(2) from None
        notifiers.append(SignalNotifier(sig, pid_file))
    if reload_url is not None:
        if reload_method.upper() not in ("POST", "GET"):
            _log(f"--reload-method {reload_method!r}: expected POST or GET")
            raise typer.Exit(2)
        notifiers.append(HTTPNotifier(reload_url, reload_method))
    if on_change is not None:
        notifiers.append(CommandNotifier(shlex.split(on_change)))
    return notifiers


# -- tls -------------------------------------------------------------------------------------


TLSCert = Annotated[
    Path | None,
    typer.Option(
        "--cert", help="Certificate chain (PEM); reloaded when it changes.", rich_help_panel=TLS
    ),
]
TLSKey = Annotated[
    Path | None, typer.Option("--key", help="Private key (PEM).", rich_help_panel=TLS)
]
SelfSigned = Annotated[
    bool,
    typer.Option(
        "--self-signed/--no-self-signed",
        help="Make a self-signed certificate (development).",
        rich_help_panel=TLS,
    ),
]
TLSAdminPort = Annotated[
    int | None,
    typer.Option(
        "--admin-port",
        help="Loopback port for /metrics, /healthz, /readyz, /status (worker i: +i).",
        rich_help_panel=ADMIN,
    ),
]


@cli.command(
    epilog=epilog(
        "podkit sidecar tls --upstream 8080 --listen :8443",
        "--cert /tls/tls.crt --key /tls/tls.key",
        docs=DOCS,
    )
)
def tls(
    upstream: Annotated[
        str,
        typer.Option(
            help="The plain-HTTP app: PORT, HOST:PORT or http://HOST:PORT.",
            rich_help_panel="Upstream",
        ),
    ],
    listen: Annotated[
        str,
        typer.Option(help=f"Address to serve HTTPS on: {LISTEN_HELP}", rich_help_panel=LISTENING),
    ] = "0.0.0.0:8443",
    cert: TLSCert = None,
    key: TLSKey = None,
    self_signed: SelfSigned = False,
    workers: Workers = 1,
    idle_timeout: IdleTimeout = 60.0,
    admin_port: TLSAdminPort = None,
) -> None:
    """HTTPS in front of a plain-HTTP app: TLS 1.2+, modern ciphers, keep-alive both
    ways, X-Forwarded-For/-Proto, WebSocket upgrades passed through."""
    import shutil
    import tempfile

    from podkit.net.listen import ListenError
    from podkit.net.proxy.config import proxy_config
    from podkit.net.proxy.workers import probe_port, serve
    from podkit.net.tls import pair_problem
    from podkit.net.tls import self_signed as make_self_signed

    target = upstream if not upstream.isdigit() else f"127.0.0.1:{upstream}"
    if self_signed == bool(cert or key) or (cert is None) != (key is None):
        _tls_log("give --cert and --key, or --self-signed")
        raise typer.Exit(2)
    try:
        config = proxy_config(listen, [target], workers=workers, scheme="https",
                              idle_timeout=idle_timeout, name="podkit sidecar tls")  # fmt: skip
    except ValueError as exc:
        _tls_log(str(exc))
        raise typer.Exit(2) from None
    tmp = None
    if self_signed:
        tmp = tempfile.mkdtemp(prefix="podkit-tls-")
        hosts = ["localhost", "127.0.0.1", *([config.host] if config.host != "0.0.0.0" else [])]
        cert, key = make_self_signed(tmp, list(dict.fromkeys(hosts)))
    assert cert is not None and key is not None
    for path in (cert, key):
        if not path.is_file():
            _tls_log(f"{path}: no such file")
            raise typer.Exit(2)
    problem = pair_problem(cert, key)
    if problem is not None:
        _tls_log(f"--cert, --key: {problem}")
        raise typer.Exit(2)
    try:
        admin_ports = [] if admin_port is None else [admin_port + i for i in range(workers)]
        for port in admin_ports:
            probe_port("127.0.0.1", port, "--admin-port")
    except ListenError as exc:
        _tls_log(str(exc))
        raise typer.Exit(1) from None
    features = _tls_workers(cert, key, admin_port)
    try:
        code = serve(
            config,
            features=features,
            ready=lambda: _tls_log(f"https://{config.host}:{config.port} -> http://{target}"),
        )
    except ListenError as exc:
        _tls_log(str(exc))
        raise typer.Exit(1) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    raise typer.Exit(code)


def _tls_workers(cert: Path, key: Path, admin_port: int | None) -> Any:
    """What each worker of the TLS sidecar adds: TLS, and the admin server on
    `admin_port + index` when asked."""
    from podkit.net.proxy.workers import TLSTermination

    class Worker(TLSTermination):
        def __init__(self, config: Any, index: int) -> None:
            super().__init__(cert, key, config.name)
            self.index = index
            self.port = None if admin_port is None else admin_port + index
            self.admin: Any = None

        async def start(self, lb: Any) -> None:
            await super().start(lb)
            if self.port is None:
                return
            from prometheus_client import CollectorRegistry

            from podkit.observe.admin import AdminServer
            from podkit.observe.engine import EngineMetrics

            registry = CollectorRegistry()
            registry.register(EngineMetrics(lb, "sidecar_tls"))
            status = {"worker": self.index, "upstreams": [u.name for u in lb.upstreams]}
            self.admin = AdminServer(
                {"/status": lambda: (200, status)}, "127.0.0.1", self.port, registry=registry
            )
            await self.admin.start()
            _tls_log(f"admin on http://127.0.0.1:{self.port} (worker {self.index})")

        async def close(self) -> None:
            if self.admin is not None:
                await self.admin.close()
            await super().close()

    return Worker
