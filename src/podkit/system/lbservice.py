"""A service with `lb:` in the spec: `podkit up` runs `podkit lb` for it, in place of the
plain TCP forwarder.

The balancer is a child process (so `workers:` can use every core) started in the spec's
directory (relative certificate paths work), in its own process group, killed with
`podkit up` even by kill -9 (parent-death signal and the runtime's watchdog). It follows
a members file that the runtime rewrites atomically whenever a replica becomes ready or
stops being ready; a replica that leaves is drained by the balancer. The service routes
once every worker of the balancer has logged that at least one member is available. Its
output goes to the log as `lb/<service>`. If it exits unexpectedly it is started again after a pause
that doubles up to 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING

from podkit.aio import wait_for
from podkit.lb.features import parse_available
from podkit.lb.members import write_members
from podkit.proc import parent_death_signal, stop_group
from podkit.system.forwarder import Endpoint
from podkit.system.spec import Service

if TYPE_CHECKING:
    from podkit.system.runtime import Runtime

START_TIMEOUT = 15.0  # seconds for the balancer to accept connections


class LBService:
    """The runtime's `ServiceProxy` for a service that names `lb:`."""

    def __init__(self, svc: Service, runtime: Runtime) -> None:
        assert svc.lb is not None
        self.svc = svc
        self.runtime = runtime
        self.source = f"lb/{svc.name}"
        self.members = runtime.state_dir / f"lb-{svc.name}.members"
        self.endpoints: list[Endpoint] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._available: dict[int, int] = {}  # worker -> members it can send to

    def argv(self) -> list[str]:
        lb = self.svc.lb
        assert lb is not None
        listen = f"{self.svc.host}:{self.svc.port}"
        argv = [sys.executable, "-m", "podkit", "lb", "--listen", listen]
        argv += ["--members-file", str(self.members), *lb.flags()]
        if lb.admin_port:
            argv += ["--admin-host", self.svc.host, "--admin-port", str(lb.admin_port)]
        return argv

    async def _spawn(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(),
            cwd=self.runtime.base_dir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )
        self.runtime.watchdog.watch(proc.pid)
        self._set_available({})
        assert proc.stdout is not None
        self._pumps.append(asyncio.create_task(self._pump(proc.stdout)))
        self.runtime.log.event(f"{self.source} started (pid {proc.pid})")
        return proc

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.runtime.log.line(self.source, text)
            if (report := parse_available(text)) is not None:
                worker, available, _ = report
                self._set_available({**self._available, worker: available})

    def _set_available(self, available: dict[int, int]) -> None:
        before = self.routing
        self._available = available
        if self.routing != before:
            self.runtime.changed()

    @property
    def routing(self) -> bool:
        """Whether every worker of the balancer can send to a member, and there are some."""
        assert self.svc.lb is not None
        workers = range(self.svc.lb.workers)
        return bool(self.endpoints) and all(self._available.get(i, 0) > 0 for i in workers)

    async def _accepting(self, proc: asyncio.subprocess.Process) -> bool:
        """Wait until the balancer accepts connections; False if it exits first."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.returncode is None:
            try:
                _, writer = await asyncio.open_connection(self.svc.host, self.svc.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        return False

    async def start(self) -> None:
        """Write the (empty) members file, start the balancer, wait until it listens."""
        self.members.parent.mkdir(parents=True, exist_ok=True)
        write_members(self.members, [])
        proc = self.proc = await self._spawn()
        if not await self._accepting(proc):
            await self._stop_proc(proc)
            raise OSError(
                0,
                f"podkit lb did not start (exit {proc.returncode}); see the lb/{self.svc.name} log",
            )
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        delay = 0.25
        while not self._closing:
            proc = self.proc
            assert proc is not None
            code = await proc.wait()
            self.runtime.watchdog.unwatch(proc.pid)
            if self._closing:
                return
            self.restarts += 1
            self.runtime.log.event(f"{self.source} exited with {code}; restarting in {delay:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            self.proc = await self._spawn()

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        """The ready replicas changed: rewrite the members file (the balancer follows it)."""
        if endpoints == self.endpoints:
            return
        self.endpoints = list(endpoints)
        write_members(self.members, [f"{host}:{port}" for host, port in endpoints])

    async def _stop_proc(self, proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
        await stop_group(proc, grace)
        self.runtime.watchdog.unwatch(proc.pid)

    async def close(self) -> None:
        """Stop accepting; the balancer drains what is in flight, then exits."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self.proc is not None:
            await self._stop_proc(self.proc)
        for t in self._pumps:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await wait_for(t, 1.0)
