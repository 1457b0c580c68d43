"""The local runtime behind `podkit up`: every container a supervised process.

Each pod replica gets its own loopback address, so replicas reuse the same ports the way
pods do on a cluster. Containers are probed, restarted with back-off, stopped gracefully
(SIGTERM, grace period, SIGKILL) in reverse order of declaration, and never outlive the
runtime (process groups, a parent-death signal and a watchdog process).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from podkit.backends.url import mask
from podkit.clock import Clock, SystemClock
from podkit.proc import Watchdog, parent_death_signal, signal_group, stop_group
from podkit.system.backoff import RestartBackoff
from podkit.system.components import component_argv
from podkit.system.forwarder import Endpoint, ServiceProxy, TCPForwarder
from podkit.system.localpod import LocalPodView
from podkit.system.probes import ProbeState, run_probe
from podkit.system.spec import Container, Pod, Service, Spec

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Expand `$(VAR)` from `env` as Kubernetes does; `$$` is a literal `$`; unknowns stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR.sub(sub, text)


SAY_AFTER = 3  # readiness failures in a row before the log hears why


def exit_text(code: int) -> str:
    """How a process ended: `exited with code 3`, or `killed by SIGKILL` for code -9."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def env_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def default_subnet(key: str) -> ipaddress.IPv4Network:
    """A /16 inside 127.0.0.0/8 chosen from `key`, so two systems rarely share addresses."""
    octet = 1 + hashlib.sha256(key.encode()).digest()[0] % 254
    return ipaddress.IPv4Network(f"127.{octet}.0.0/16")


class LogSink:
    """Writes container output as `pod-0/container | line`, one colour per container.

    A writer thread does the writing, so a slow reader of our stdout never stalls the
    event loop; past `backlog` unwritten lines, lines are dropped and counted.
    """

    COLOURS = ("36", "32", "33", "35", "34", "96", "92", "93", "95", "94")

    def __init__(
        self, out: TextIO | None = None, colour: bool | None = None, backlog: int = 100_000
    ) -> None:
        self.out = out or sys.stdout
        self.colour = self.out.isatty() if colour is None else colour
        self._assigned: dict[str, str] = {}
        self.width = 12
        self.dropped = 0
        self._lines: queue.Queue[str | None] = queue.Queue(backlog)
        self._thread = threading.Thread(target=self._write_loop, name="podkit-logs", daemon=True)
        self._thread.start()

    def _write_loop(self) -> None:
        while (text := self._lines.get()) is not None:
            try:
                self.out.write(text)
                if self._lines.empty():
                    self.out.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        self._lines.put(None)
        self._thread.join(timeout=5)

    def line(self, source: str, text: str) -> None:
        self.width = max(self.width, len(source))
        label = source.ljust(self.width)
        if self.colour:
            code = self._assigned.setdefault(
                source, self.COLOURS[len(self._assigned) % len(self.COLOURS)]
            )
            label = f"\x1b[{code}m{label}\x1b[0m"
        try:
            if self.dropped:
                self._lines.put_nowait(
                    f"{'podkit'.ljust(self.width)} | {self.dropped} lines dropped\n"
                )
                self.dropped = 0
            self._lines.put_nowait(f"{label} | {text}\n")
        except queue.Full:
            self.dropped += 1

    def event(self, text: str) -> None:
        self.line("podkit", text)


@dataclass
class ContainerStatus:
    """What `podkit status` shows for one container."""

    name: str
    state: str = "waiting"
    pid: int | None = None
    ready: bool = False
    restarts: int = 0
    exit_code: int | None = None
    started_at: float | None = None
    message: str = ""


class ContainerRunner:
    """Runs one container of one pod replica: start, probe, restart, stop."""

    def __init__(self, replica: PodReplica, spec: Container, runtime: Runtime) -> None:
        self.replica = replica
        self.spec = spec
        self.runtime = runtime
        self.status = ContainerStatus(spec.name)
        self.backoff = RestartBackoff(**runtime.backoff_options)
        self.env = self._environment()
        self.argv = self._argv()
        self.cwd = self._cwd()
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._liveness_failed = asyncio.Event()
        self._failing = 0  # readiness probes failed in a row
        self._said = False  # whether the log was told it is not ready
        self._said_message = ""
        self._task: asyncio.Task[None] | None = None
        self.log_source = f"{replica.name}/{spec.name}"

    def _environment(self) -> dict[str, str]:
        rt, rep = self.runtime, self.replica
        env = dict(os.environ)
        # programs find the Python (and the podkit) that runs `podkit up` first
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = os.pathsep.join(
            [bindir, *(p for p in env.get("PATH", "").split(os.pathsep) if p != bindir)]
        )
        env.update(
            {
                "POD_IP": rep.ip,
                "POD_NAME": rep.name,
                "POD_NAMESPACE": rt.spec.name,
                "REPLICA": str(rep.index),
                "PYTHONUNBUFFERED": "1",
            }
        )
        for name, url in rt.backends.items():
            env[f"PODKIT_BACKEND_{env_name(name)}"] = url
        for svc in rt.spec.services:
            env[f"{env_name(svc.name)}_SERVICE_HOST"] = svc.host
            env[f"{env_name(svc.name)}_SERVICE_PORT"] = str(svc.port)
        for vol in self.spec.volumes:
            env[f"VOLUME_{env_name(vol)}"] = str(rep.volume_dir(vol))
        for port_name, number in rep.ports.items():
            env[f"PORT_{env_name(port_name)}"] = str(number)
        for key, value in self.spec.env.items():
            env[key] = expand(value, env)
        return env

    def _argv(self) -> list[str]:
        if self.spec.component is not None:
            options = {
                k: expand(v, self.env) if isinstance(v, str) else v
                for k, v in self.spec.with_.items()
            }
            return component_argv(self.spec.component, options)
        assert self.spec.command is not None
        return [expand(a, self.env) for a in (*self.spec.command, *self.spec.args)]

    def _cwd(self) -> str:
        base = self.runtime.base_dir
        if self.spec.workdir:
            return str((base / expand(self.spec.workdir, self.env)).resolve())
        return str(base)

    @property
    def ready(self) -> bool:
        return self.status.ready

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        rt = self.runtime
        policy = self.replica.pod.restart
        while not self._stopping:
            code = await self._run_once()
            if self._stopping:
                break
            self.status.exit_code = code
            rt.exited(self, code)
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                self.status.state = "completed" if code == 0 else "failed"
                rt.log.event(f"{self.log_source} {exit_text(code)}; restart policy {policy}")
                rt.changed()  # a completed container no longer holds the system back
                return
            delay = self.backoff.exited(rt.clock.now())
            self.status.restarts += 1
            self.status.state = "backoff"
            self.status.message = f"restarting in {delay:.2f}s"
            rt.log.event(f"{self.log_source} {exit_text(code)}; restarting in {delay:.2f}s")
            await rt.clock.sleep(delay)

    async def _run_once(self) -> int:
        rt = self.runtime
        self._liveness_failed.clear()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=parent_death_signal(),
                limit=1 << 20,
            )
        except OSError as exc:
            self.status.state = "failed"
            self.status.message = f"cannot start {self.argv[0]!r}: {exc.strerror}"
            rt.log.event(f"{self.log_source}: {self.status.message}")
            return 127
        self._proc = proc
        rt.watchdog.watch(proc.pid)
        self.backoff.started(rt.clock.now())
        self.status.pid = proc.pid
        self.status.state = "running"
        self.status.started_at = time.time()
        self.status.message = ""
        rt.log.event(f"{self.log_source} started (pid {proc.pid})")
        assert proc.stdout is not None and proc.stderr is not None
        tasks = [
            asyncio.create_task(self._pump(proc.stdout)),
            asyncio.create_task(self._pump(proc.stderr)),
        ]
        if self.spec.readiness is None:
            self._set_ready(True)
        else:
            tasks.append(asyncio.create_task(self._readiness_loop()))
        if self.spec.liveness is not None:
            tasks.append(asyncio.create_task(self._liveness_loop()))
        waiter = asyncio.create_task(proc.wait())
        dead = asyncio.create_task(self._liveness_failed.wait())
        await asyncio.wait([waiter, dead], return_when=asyncio.FIRST_COMPLETED)
        if dead.done() and not waiter.done():
            rt.log.event(f"{self.log_source} failed its liveness probe; restarting")
            await self._terminate(self.replica.pod.grace_period)
        code = await waiter
        dead.cancel()
        self._set_ready(False)
        for t in tasks[2:]:
            t.cancel()
        # the container is gone: so is anything it left in its process group
        signal_group(proc.pid, signal.SIGKILL)
        rt.watchdog.unwatch(proc.pid)
        await asyncio.gather(*tasks[:2], return_exceptions=True)
        self.status.pid = None
        self.status.state = "terminated"
        return code

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the limit: emit what we have
                line = await stream.read(1 << 20)
            if not line:
                return
            self.runtime.log.line(self.log_source, line.decode(errors="replace").rstrip("\n"))

    def _set_ready(self, ready: bool) -> None:
        if ready != self.status.ready:
            self.status.ready = ready
            self.runtime.changed()

    async def _readiness_loop(self) -> None:
        probe = self.spec.readiness
        assert probe is not None
        state = ProbeState(probe.success_threshold, probe.failure_threshold)
        await self.runtime.clock.sleep(probe.initial_delay)
        while True:
            ok, why = await run_probe(
                probe, self.replica.ip, self.replica.ports, self.env, self.cwd
            )
            self._readiness_said(ok, why)
            if state.record(ok):
                self._set_ready(state.healthy)
            await self.runtime.clock.sleep(probe.period)

    def _readiness_said(self, ok: bool, why: str) -> None:
        """Keep why the container is not ready in its status; log each new reason once
        it has failed SAY_AFTER probes in a row (a starting app is not news), and log
        when it is ready again after that."""
        self._failing = 0 if ok else self._failing + 1
        before = self.status.message
        if ok:
            if before.startswith("not ready:"):
                if self._said:
                    self.runtime.log.event(f"{self.log_source} ready")
                self.status.message = ""
            self._said = False
            self._said_message = ""
            return
        message = f"not ready: {why}"
        self.status.message = message
        if self._failing >= SAY_AFTER and message != self._said_message:
            self.runtime.log.event(f"{self.log_source} {message}")
            self._said = True
            self._said_message = message

    async def _liveness_loop(self) -> None:
        probe = self.spec.liveness
        assert probe is not None
        state = ProbeState(probe.success_threshold, probe.failure_threshold, healthy=True)
        await self.runtime.clock.sleep(probe.initial_delay)
        while True:
            ok, why = await run_probe(
                probe, self.replica.ip, self.replica.ports, self.env, self.cwd
            )
            if not ok:
                self.status.message = f"liveness failing: {why}"
            if state.record(ok) and not state.healthy:
                self.runtime.log.event(f"{self.log_source} liveness failed: {why}")
                self._liveness_failed.set()
                return
            await self.runtime.clock.sleep(probe.period)

    async def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is not None and await stop_group(proc, grace):
            self.runtime.log.event(f"{self.log_source} did not stop in {grace}s: SIGKILL")

    async def stop(self, grace: float) -> None:
        """Stop for good: SIGTERM to the process group, SIGKILL after `grace` seconds."""
        self._stopping = True
        await self._terminate(grace)
        if self._task is not None:
            if not self._task.done():
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.status.state = "stopped"
        self.status.ready = False


class PodReplica:
    """One copy of a pod: an address, volumes and its containers."""

    def __init__(self, pod: Pod, index: int, ip: str, runtime: Runtime) -> None:
        self.pod = pod
        self.index = index
        self.ip = ip
        self.name = f"{pod.name}-{index}"
        self.runtime = runtime
        containers = pod.all_containers()
        self.ports = {n: p for c in containers for n, p in c.ports.items()}
        for vol in pod.volumes:
            self.volume_dir(vol).mkdir(parents=True, exist_ok=True)
        self.containers = [ContainerRunner(self, c, runtime) for c in containers]

    def volume_dir(self, volume: str) -> Path:
        return self.runtime.state_dir / "volumes" / self.name / volume

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.containers)

    def start(self) -> None:
        for c in self.containers:
            c.start()

    async def stop(self) -> None:
        """Stop containers in reverse order of declaration within the pod's grace period."""
        deadline = time.monotonic() + self.pod.grace_period
        for c in reversed(self.containers):
            await c.stop(max(0.1, deadline - time.monotonic()))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pod": self.pod.name,
            "replica": self.index,
            "ip": self.ip,
            "ready": self.ready,
            "ports": self.ports,
            "containers": [
                {
                    "name": c.status.name,
                    "state": c.status.state,
                    "pid": c.status.pid,
                    "ready": c.status.ready,
                    "restarts": c.status.restarts,
                    "exit_code": c.status.exit_code,
                    "message": c.status.message,
                }
                for c in self.containers
            ],
        }


ProxyFactory = Callable[[Service], ServiceProxy]


class Runtime:
    """Runs a whole spec on this machine."""

    def __init__(
        self,
        spec: Spec,
        *,
        base_dir: Path,
        clock: Clock | None = None,
        log: LogSink | None = None,
        subnet: str | None = None,
        backoff: Mapping[str, float] | None = None,
        proxy_factory: ProxyFactory | None = None,
        settle: float = 1.0,
        start_window: float = 30.0,
    ) -> None:
        self.spec = spec
        self.settle = settle
        self.start_window = start_window  # seconds to be ready before the log names who is not
        self.base_dir = base_dir.resolve()
        self.state_dir = self.base_dir / ".podkit" / spec.name
        self.clock: Clock = clock or SystemClock()
        self.log = log or LogSink()
        self.backoff_options = dict(backoff or {})
        self.backends = dict(spec.backends)
        self.backends.setdefault("state", f"sqlite:///{self.state_dir / 'state.db'}")
        net = (
            ipaddress.IPv4Network(subnet)
            if subnet
            else default_subnet(f"{self.base_dir}/{spec.name}")
        )
        self._addresses = (str(a) for a in net.hosts() if int(a) & 0xFF not in (0, 1, 255))
        self.proxy_factory = proxy_factory or self._default_proxy
        self.replicas: list[PodReplica] = []
        self.proxies: dict[str, ServiceProxy] = {}
        self.watchdog: Watchdog
        self.started_at = time.time()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._announced = False
        self._settling: asyncio.Task[None] | None = None
        self._exits_reported: set[str] = set()
        self._controls: list[asyncio.Task[None]] = []  # hooks' loops, and the start window
        self.scale_events: list[tuple[float, str, int, int]] = []

    def _default_proxy(self, svc: Service) -> ServiceProxy:
        """The program of the service's hook (`lb:`), else the plain TCP forwarder."""
        hooked = svc.hook()
        if hooked is not None:
            from podkit.system.procservice import ProcessService

            return ProcessService(svc, *hooked, self)
        return TCPForwarder(svc.host, svc.port, name=svc.name)

    async def start(self) -> None:
        """Start services, then every pod replica."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.watchdog = Watchdog()
        for svc in self.spec.services:
            proxy = self.proxy_factory(svc)
            try:
                await proxy.start()
            except OSError as exc:
                await self.stop()
                raise RuntimeError(
                    f"service '{svc.name}': cannot listen on {svc.host}:{svc.port}: {exc.strerror}"
                ) from None
            self.proxies[svc.name] = proxy
        for pod in self.spec.pods:
            count = pod.replicas
            for hook, options in pod.hooks():
                count = hook.initial_replicas(options, count)
            for _ in range(count):
                self.add_replica(pod)
            for hook, options in pod.hooks():
                control = hook.control(LocalPodView(self, pod), options)
                self._controls.append(asyncio.create_task(control))
        self._controls.append(asyncio.create_task(self._not_ready_yet()))

    def add_replica(self, pod: Pod) -> PodReplica:
        """Start one more replica of `pod` (the next free index, a new address)."""
        used = {r.index for r in self.replicas if r.pod is pod}
        index = next(i for i in range(len(used) + 1) if i not in used)
        rep = PodReplica(pod, index, next(self._addresses), self)
        self.replicas.append(rep)
        rep.start()
        return rep

    async def remove_replica(self, pod: Pod) -> None:
        """Stop the highest-numbered replica of `pod` gracefully."""
        reps = [r for r in self.replicas if r.pod is pod]
        if not reps:
            return
        rep = max(reps, key=lambda r: r.index)
        self.replicas.remove(rep)
        self.changed()
        await rep.stop()

    @property
    def stopping(self) -> bool:
        """Whether the system is shutting down."""
        return self._stopping

    async def scale(self, pod: Pod, count: int) -> None:
        """Start or stop replicas of `pod` until it has `count`."""
        current = sum(1 for r in self.replicas if r.pod is pod)
        if count != current:
            self.scale_events.append((time.time(), pod.name, current, count))
        for _ in range(current, count):
            self.add_replica(pod)
        for _ in range(count, current):
            await self.remove_replica(pod)

    def changed(self) -> None:
        """A container's readiness or a service's routing changed: recompute every
        service's endpoints, and see whether the system is now ready."""
        for svc in self.spec.services:
            proxy = self.proxies.get(svc.name)
            if proxy is not None:
                proxy.set_endpoints(self.endpoints(svc))
        if self._announced or self._stopping:
            return
        if not self.ready():
            if self._settling is not None:
                self._settling.cancel()
                self._settling = None
        elif self._settling is None:
            self._settling = asyncio.get_running_loop().create_task(self._announce())

    def ready(self) -> bool:
        """Every replica ready (its containers ready, or done under a restart policy that
        lets them end), and every service of a pod with replicas routing to one."""
        if not self.replicas:
            return False
        for rep in self.replicas:
            if not all(c.ready or c.status.state == "completed" for c in rep.containers):
                return False
        running = {rep.pod.name for rep in self.replicas}
        for svc in self.spec.services:
            proxy = self.proxies.get(svc.name)
            if svc.pods in running and (proxy is None or not proxy.routing):
                return False
        return True

    async def _not_ready_yet(self) -> None:
        """After the start window, name the containers that keep the system from being
        ready, with why (the probe's reason, a restart), if it is not ready by then."""
        await self.clock.sleep(self.start_window)
        if self._announced or self._stopping:
            return
        waiting = [
            f"{c.log_source} ({c.status.message or c.status.state})"
            for rep in self.replicas
            for c in rep.containers
            if not (c.ready or c.status.state == "completed")
        ]
        who = ", ".join(waiting) or "a service that does not route yet"
        self.log.event(f"{self.spec.name} is not ready after {self.start_window:g}s: {who}")

    async def _announce(self) -> None:
        """Print `<name> is ready` once the system has stayed ready for `settle` seconds
        (any change to not ready cancels this), so apps that crash at once never get it."""
        await self.clock.sleep(self.settle)
        self._settling = None
        if self.ready() and not self._announced and not self._stopping:
            self._announced = True
            urls = ", ".join(self.spec.service_url(s) for s in self.spec.services)
            self.log.event(f"{self.spec.name} is ready" + (f": try {urls}" if urls else ""))

    def exited(self, runner: ContainerRunner, code: int) -> None:
        """A container exited on its own: before the system is ready, say so (once each)."""
        policy = runner.replica.pod.restart
        if self._announced or (code == 0 and policy != "Always"):
            return
        if runner.log_source not in self._exits_reported:
            self._exits_reported.add(runner.log_source)
            reason = f" ({runner.status.message})" if code == 127 and runner.status.message else ""
            self.log.event(
                f"{self.spec.name} is not ready: {runner.log_source} {exit_text(code)}{reason}"
            )

    def endpoints(self, svc: Service) -> list[Endpoint]:
        out: list[Endpoint] = []
        for rep in self.replicas:
            if rep.pod.name != svc.pods or not rep.ready:
                continue
            port = rep.ports[svc.target] if isinstance(svc.target, str) else svc.target
            out.append((rep.ip, port))
        return out

    async def stop(self) -> None:
        """Graceful shutdown: services stop accepting, then pods stop (last pod first)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.log.event("stopping")
        if self._settling is not None:
            self._settling.cancel()
        for task in self._controls:
            task.cancel()
        for proxy in self.proxies.values():
            await proxy.close()
        by_pod: dict[str, list[PodReplica]] = {}
        for rep in self.replicas:
            by_pod.setdefault(rep.pod.name, []).append(rep)
        for pod in reversed(self.spec.pods):
            await asyncio.gather(*(r.stop() for r in by_pod.get(pod.name, [])))
        if hasattr(self, "watchdog"):
            self.watchdog.close()
        self.log.event("stopped")
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    def force_kill(self) -> None:
        """Second Ctrl-C: kill everything now."""
        for rep in self.replicas:
            for c in rep.containers:
                if c.status.pid:
                    signal_group(c.status.pid, signal.SIGKILL)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "backends": {k: mask(v) for k, v in self.backends.items()},
            "pods": [r.describe() for r in self.replicas],
            "services": [
                {
                    "name": s.name,
                    "url": self.spec.service_url(s),
                    "pods": s.pods,
                    "endpoints": [f"{h}:{p}" for h, p in self.endpoints(s)],
                }
                for s in self.spec.services
            ],
        }
