"""A service whose spec names a service hook (`lb:`): `podkit up` runs the hook's program
for it, in place of the plain TCP forwarder.

The program is a child process (so it can use every core) started in the spec's
directory (relative certificate paths work), in its own process group, killed with
`podkit up` even by kill -9 (parent-death signal and the runtime's watchdog). It follows
a members file, one `host:port` per line, that the runtime rewrites atomically whenever a
replica becomes ready or stops being ready. The service routes while every one of the
program's ready ports answers its ready path with a 2xx (probed every `PROBE_PERIOD`). Its
output goes to the log as `<command>/<service>`. If it exits unexpectedly it is started
again after a pause that doubles up to 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from podkit.aio import wait_for
from podkit.contract import Process, ServiceHook
from podkit.net.discovery import format_endpoint, write_members
from podkit.proc import parent_death_signal, stop_group
from podkit.system.forwarder import Endpoint
from podkit.system.probes import http_check
from podkit.system.spec import Service

if TYPE_CHECKING:
    from podkit.system.runtime import Runtime

START_TIMEOUT = 15.0  # seconds for the program to accept connections
PROBE_PERIOD = 0.1  # seconds between readiness probes of its ready ports


def free_ports(host: str, count: int, tries: int = 50) -> int:
    """The first of `count` consecutive ports free on `host` now."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind((host, 0))
            first: int = s.getsockname()[1]
        if first + count > 65535:
            continue
        held = []
        try:
            for port in range(first, first + count):
                t = socket.socket()
                held.append(t)
                t.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise OSError(0, f"no {count} consecutive free ports on {host}")


class ProcessService:
    """The runtime's `ServiceProxy` for a service that names a service hook."""

    def __init__(self, svc: Service, hook: ServiceHook, options: Any, runtime: Runtime) -> None:
        self.svc = svc
        self.runtime = runtime
        self.source = f"{hook.key}/{svc.name}"
        self.members = runtime.state_dir / f"{hook.key}-{svc.name}.members"
        self.endpoints: list[Endpoint] = []
        self.program: Process = hook.process(
            svc.name, svc.host, svc.port, options, lambda n: free_ports(svc.host, n)
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._closing = False
        self._ready = False
        self._generation = 0  # changes with the members: older probe results are stale
        self._pumps: list[asyncio.Task[None]] = []
        self._loops: list[asyncio.Task[None]] = []

    def argv(self) -> list[str]:
        return self.program.argv(str(self.members))

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
        self._set_ready(False)
        assert proc.stdout is not None
        self._pumps.append(asyncio.create_task(self._pump(proc.stdout)))
        self.runtime.log.event(f"{self.source} started (pid {proc.pid})")
        return proc

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.runtime.log.line(self.source, line.decode("utf-8", "replace").rstrip("\n"))

    def _set_ready(self, ready: bool) -> None:
        before = self.routing
        self._ready = ready
        if self.routing != before:
            self.runtime.changed()

    @property
    def routing(self) -> bool:
        """Whether the program has members and every ready port answers ready."""
        return bool(self.endpoints) and self._ready

    async def _probe(self) -> None:
        """Probe the ready ports while the service runs."""
        p = self.program
        while not self._closing:
            generation = self._generation
            answers = await asyncio.gather(
                *(http_check(p.ready_host, port, p.ready_path, 1.0) for port in p.ready_ports)
            )
            if generation == self._generation:
                self._set_ready(all(ok for ok, _ in answers))
            await asyncio.sleep(PROBE_PERIOD)

    async def _accepting(self, proc: asyncio.subprocess.Process) -> bool:
        """Wait until the program accepts connections; False if it exits first."""
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
        """Write the (empty) members file, start the program, wait until it listens."""
        self.members.parent.mkdir(parents=True, exist_ok=True)
        write_members(self.members, [])
        proc = self.proc = await self._spawn()
        if not await self._accepting(proc):
            await self._stop_proc(proc)
            raise OSError(
                0,
                f"the {self.source.split('/')[0]} of service '{self.svc.name}' did not start "
                f"(exit {proc.returncode}); see the {self.source} log",
            )
        self._loops += [
            asyncio.create_task(self._supervise()),
            asyncio.create_task(self._probe()),
        ]

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
        """The ready replicas changed: rewrite the members file (the program follows it)."""
        if endpoints == self.endpoints:
            return
        before = self.routing
        self.endpoints = list(endpoints)
        self._generation += 1
        write_members(self.members, map(format_endpoint, self.endpoints))
        if not self.endpoints:
            self._ready = False  # until the program answers ready with members again
        if self.routing != before:
            self.runtime.changed()

    async def _stop_proc(self, proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
        await stop_group(proc, grace)
        self.runtime.watchdog.unwatch(proc.pid)

    async def close(self) -> None:
        """Stop accepting; the program drains what is in flight, then exits."""
        self._closing = True
        for t in self._loops:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.proc is not None:
            await self._stop_proc(self.proc)
        for t in self._pumps:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await wait_for(t, 1.0)
