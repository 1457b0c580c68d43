"""`podkit elect`: the leader-elector sidecar.

It campaigns for `--name` on a KV backend and answers on its HTTP port:
`GET /leader` (the leader's identity and fencing token, 404 when there is none) and
`GET /me` (whether this replica leads). With `--exec CMD` it runs CMD only while it
leads (with PODKIT_LEADER_TOKEN in its environment) and stops it (SIGTERM, then SIGKILL
after `--grace`) as soon as leadership is lost, by the local lease deadline, whether or
not the backend is reachable. When CMD exits by itself the elector resigns and queues
again; when it ran less than EXEC_STABLE seconds, only after a pause that doubles from
0.5 s to 30 s with each quick exit in a row.

The identity defaults to POD_NAME (set on Kubernetes and by `podkit up`), else
`<hostname>-<pid>`, so candidates on one machine are told apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from podkit.aio import run_async, stop_event, wait_for
from podkit.backends import BackendError, open_kv
from podkit.clihelp import App, epilog
from podkit.election.core import Election, LeaderElection, LeadershipLost
from podkit.net.listen import ListenError, listening
from podkit.observe.admin import AdminServer
from podkit.proc import parent_death_signal, stop_group


@dataclass
class ElectorConfig:
    backend: str
    name: str
    identity: str
    ttl: float = 5.0
    host: str = "127.0.0.1"
    port: int = 4040
    exec: list[str] | None = None
    grace: float | None = None


def log(message: str) -> None:
    print(f"elect: {message}", file=sys.stderr, flush=True)


EXEC_STABLE = 10.0  # seconds: a command that ran this long resets the back-off
EXEC_BACKOFF = (0.5, 30.0)  # the first and the longest pause after a quick exit
CLOSE_WAIT = 3.0  # seconds each step of a stop may take (resigning, closing the backend)


class Elector:
    """Campaign forever; serve the state; run the command while leading."""

    def __init__(self, config: ElectorConfig, election: Election) -> None:
        self.config = config
        self.election = election
        self.child: asyncio.subprocess.Process | None = None
        self.pause = 0.0  # the pause after the command's last quick exit
        self.http = AdminServer(
            {"/leader": self.leader, "/me": self.me, "/healthz": lambda: (200, {"ok": True})},
            config.host,
            config.port,
        )

    async def leader(self) -> tuple[int, Any]:
        try:
            current = await self.election.current_leader()
        except (BackendError, OSError) as exc:
            return 503, {"error": f"backend unavailable: {exc}"}
        if current is None:
            return 404, {"leader": None}
        return 200, {"identity": current.identity, "token": current.token}

    def me(self) -> tuple[int, Any]:
        e = self.election
        return 200, {"identity": e.identity, "leader": e.is_leader, "token": e.token}

    async def run(self) -> None:
        await listening(self.http.start(), "--port", self.config.host, self.config.port)
        log(f"{self.config.identity} campaigning for '{self.config.name}' on {self.http.url}")
        while True:
            try:
                leader = await self.election.campaign()
            except (LeadershipLost, BackendError, OSError) as exc:
                log(f"campaign failed ({exc}); retrying")
                await asyncio.sleep(min(1.0, self.config.ttl / 4))
                continue
            log(f"leading '{self.config.name}' with token {leader.token}")
            await self._lead()

    async def _lead(self) -> None:
        lost = asyncio.create_task(self.election.wait_lost())
        waits: set[asyncio.Task[Any]] = {lost}
        started = time.monotonic()
        if self.config.exec:
            env = dict(os.environ, PODKIT_LEADER_TOKEN=str(self.election.token))
            self.child = await asyncio.create_subprocess_exec(
                *self.config.exec,
                env=env,
                start_new_session=True,
                preexec_fn=parent_death_signal(),
            )
            waits.add(asyncio.create_task(self.child.wait()))
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        if lost in done:
            log("leadership lost: stopping")
            grace = self.election.margin if self.config.grace is None else self.config.grace
            await self._stop_child(grace)
            await self.election.resign()
        else:
            code = self.child.returncode if self.child else None
            await self.election.resign()
            ran = time.monotonic() - started
            # a command that keeps failing at once is not restarted in a tight loop
            self.pause = EXEC_BACKOFF[0] if ran >= EXEC_STABLE else min(
                self.pause * 2 or EXEC_BACKOFF[0], EXEC_BACKOFF[1]
            )  # fmt: skip
            wait = 0.0 if ran >= EXEC_STABLE else self.pause
            log(f"command exited with {code} after {ran:.1f}s: resigning; "
                f"campaigning again in {wait:g}s")  # fmt: skip
            self.child = None
            await asyncio.sleep(wait)
        self.child = None

    async def _stop_child(self, grace: float) -> None:
        if self.child is not None:
            await stop_group(self.child, grace)

    async def close(self) -> None:
        await self._stop_child(0.5)
        await self.http.close()
        await self.election.resign()


async def _election(config: ElectorConfig) -> tuple[Election, Callable[[], Awaitable[None]]]:
    """The election for the backend URL, and how to close its client."""
    if config.backend.startswith("k8s://"):
        from lightkube import AsyncClient

        from podkit.election.k8s import KubeLeaseElection

        namespace = config.backend[len("k8s://") :].strip("/") or "default"
        client = AsyncClient(namespace=namespace)
        election: Election = KubeLeaseElection(
            client, config.name, config.identity, namespace=namespace, lease_duration=config.ttl
        )
        return election, client.close
    kv = await open_kv(config.backend)
    return LeaderElection(kv, config.name, config.identity, config.ttl), kv.close


async def run(config: ElectorConfig) -> None:
    """Run the elector until cancelled or signalled."""
    election, close = await _election(config)
    elector = Elector(config, election)
    stop = stop_event()
    task = asyncio.create_task(elector.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # a backend that does not answer must not hold a stopping elector: the lease then
    # lapses by its TTL, and fencing tokens keep a late write out
    with contextlib.suppress(TimeoutError):
        await wait_for(elector.close(), CLOSE_WAIT)
    with contextlib.suppress(TimeoutError):
        await wait_for(close(), CLOSE_WAIT)
    if task.done() and not task.cancelled() and task.exception():
        raise task.exception()  # type: ignore[misc]


cli = App()
ELECTION = "Election"
HTTP = "HTTP"
COMMAND = "Command"


@cli.command(
    "elect",
    no_args_is_help=True,
    epilog=epilog(
        "podkit elect --backend sqlite:///state.db --name nightly",
        "--exec 'python3 report.py'",
        docs="docs/election.md",
    ),
)
def elect(
    backend: Annotated[
        str,
        typer.Option(
            help="KV backend URL, or k8s://NAMESPACE for a Kubernetes Lease.",
            envvar="PODKIT_BACKEND_STATE",
            rich_help_panel=ELECTION,
        ),
    ],
    name: Annotated[str, typer.Option(help="The election's name.", rich_help_panel=ELECTION)],
    identity: Annotated[
        str | None,
        typer.Option(
            help="This candidate's identity.",
            show_default="$POD_NAME, else HOSTNAME-PID",
            rich_help_panel=ELECTION,
        ),
    ] = None,
    ttl: Annotated[
        float, typer.Option(help="Lease TTL in seconds.", rich_help_panel=ELECTION)
    ] = 5.0,
    host: Annotated[str, typer.Option(help="HTTP address.", rich_help_panel=HTTP)] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            help="HTTP port (/leader, /me); 0: a free one, printed at start.",
            rich_help_panel=HTTP,
        ),
    ] = 0,
    exec_: Annotated[
        str | None,
        typer.Option("--exec", help="Command to run only while leading.", rich_help_panel=COMMAND),
    ] = None,
    grace: Annotated[
        float | None,
        typer.Option(
            help="Seconds from SIGTERM to SIGKILL when leadership is lost.",
            show_default="the lease's margin, TTL/4 up to 0.5",
            rich_help_panel=COMMAND,
        ),
    ] = None,
) -> None:
    """Campaign for leadership; serve /leader and /me; run --exec only while leading."""
    config = ElectorConfig(
        backend=backend,
        name=name,
        identity=identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        ttl=ttl,
        host=host,
        port=port,
        exec=shlex.split(exec_) if exec_ else None,
        grace=grace,
    )
    try:
        run_async(run(config))
    except (BackendError, ListenError) as exc:
        log(str(exc))
        raise typer.Exit(1) from None
