"""`podkit elect`: the leader-elector sidecar.

It campaigns for `--name` on a KV backend and answers on its HTTP port:
`GET /leader` (the leader's identity and fencing token, 404 when there is none) and
`GET /me` (whether this replica leads). With `--exec CMD` it runs CMD only while it
leads (with PODKIT_LEADER_TOKEN in its environment) and stops it (SIGTERM, then SIGKILL
after `--grace`) as soon as leadership is lost, by the local lease deadline, whether or
not the backend is reachable. When CMD exits by itself the elector resigns and queues
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from podkit.aio import run_async, stop_event
from podkit.backends import BackendError, open_kv
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


class Elector:
    """Campaign forever; serve the state; run the command while leading."""

    def __init__(self, config: ElectorConfig, election: Election) -> None:
        self.config = config
        self.election = election
        self.child: asyncio.subprocess.Process | None = None
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
            log(f"command exited with {code}: resigning")
            await self.election.resign()
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
    await elector.close()
    await close()
    if task.done() and not task.cancelled() and task.exception():
        raise task.exception()  # type: ignore[misc]


cli = typer.Typer(help="Leader election.", no_args_is_help=True)


@cli.callback(invoke_without_command=True)
def elect(
    backend: Annotated[
        str,
        typer.Option(
            help="KV backend URL, or k8s://NAMESPACE for a Kubernetes Lease.",
            envvar="PODKIT_BACKEND_STATE",
        ),
    ],
    name: Annotated[str, typer.Option(help="The election's name.")],
    identity: Annotated[
        str | None, typer.Option(help="This candidate's identity [default: POD_NAME or host]")
    ] = None,
    ttl: Annotated[float, typer.Option(help="Lease TTL in seconds.")] = 5.0,
    host: Annotated[str, typer.Option(help="HTTP address.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="HTTP port (/leader, /me); 0: a free one, printed at start.")
    ] = 0,
    exec_: Annotated[
        str | None, typer.Option("--exec", help="Command to run only while leading.")
    ] = None,
    grace: Annotated[
        float | None, typer.Option(help="Seconds between SIGTERM and SIGKILL on loss.")
    ] = None,
) -> None:
    """Campaign for leadership; serve /leader and /me; run --exec only while leading."""
    config = ElectorConfig(
        backend=backend,
        name=name,
        identity=identity or os.environ.get("POD_NAME") or socket.gethostname(),
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
