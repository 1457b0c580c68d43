"""Worker processes: N copies of a proxy sharing one port through SO_REUSEPORT.

First the ports are checked (`ListenError` names the one that cannot be bound), the
proxy's without SO_REUSEPORT, so a port another process holds is refused rather than
silently shared with it. With `workers == 1` the proxy runs in this process. With more,
this process becomes a small supervisor: it forks the workers (each binds its own
SO_REUSEPORT socket, so the kernel spreads new connections across them), restarts a
worker that dies, and on SIGTERM or SIGINT passes the signal on and waits for the
workers to drain. Until a process has its handlers (the supervisor its own, a worker its
event loop's), it keeps SIGTERM and SIGINT blocked, so one that comes while it starts (a
Ctrl-C or a SIGTERM to the whole process group) waits for them and is not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from ssl import SSLContext
from typing import Protocol

from podkit.aio import run_async, stop_event
from podkit.net.listen import ListenError
from podkit.net.proxy.engine import Proxy, ProxyConfig, listen_socket, log
from podkit.net.proxy.hooks import Filter

FilterFactory = Callable[[ProxyConfig], Sequence[Filter]]
ProxyFactory = Callable[..., Proxy]  # (config, *, filters) -> Proxy: a class or a partial


class WorkerFeatures(Protocol):
    """What one worker adds to its proxy: filters, a TLS context, background tasks."""

    filters: Sequence[Filter]
    ssl: SSLContext | None

    async def start(self, lb: Proxy) -> None: ...

    async def close(self) -> None: ...


FeaturesFactory = Callable[[ProxyConfig, int], WorkerFeatures]  # (config, worker index)
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


async def run_worker(
    config: ProxyConfig,
    filters: FilterFactory | None = None,
    grace: float = 5.0,
    sock: socket.socket | None = None,
    features: FeaturesFactory | None = None,
    index: int = 0,
    proxy: ProxyFactory = Proxy,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain for up to `grace` seconds. `proxy` makes
    the worker's proxy (`Proxy`, a subclass, or a partial with a policy)."""
    stop = stop_event()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by `serve` until now
    extra = features(config, index) if features else None
    chain = [*(filters(config) if filters else ()), *(extra.filters if extra else ())]
    lb = proxy(config, filters=chain)
    await lb.start(sock, ssl=extra.ssl if extra else None)
    if extra is not None:
        await extra.start(lb)
    # What exists now lives as long as the worker: keep it out of the collector's scans,
    # so a full collection never walks the CLI's modules in the middle of requests.
    gc.collect()
    gc.freeze()
    await stop.wait()
    await lb.close(grace)
    if extra is not None:
        await extra.close()


def _worker_main(
    config: ProxyConfig,
    filters: FilterFactory | None,
    sock: socket.socket | None,
    features: FeaturesFactory | None = None,
    index: int = 0,
    proxy: ProxyFactory = Proxy,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM stops us
    with contextlib.suppress(KeyboardInterrupt):
        run_async(
            run_worker(config, filters, sock=sock, features=features, index=index, proxy=proxy)
        )


def probe_port(host: str, port: int, flag: str = "") -> int:
    """Raise ListenError unless `host:port` can be bound by this process alone; return
    the port (the one the system gave for port 0)."""
    try:
        with listen_socket(host, port, False, 1) as sock:
            return int(sock.getsockname()[1])
    except OSError as exc:
        raise ListenError.of(exc, host, port, flag) from None


def serve(
    config: ProxyConfig,
    filters: FilterFactory | None = None,
    features: FeaturesFactory | None = None,
    ready: Callable[[], None] | None = None,
    proxy: ProxyFactory = Proxy,
) -> int:
    """Run `config.workers` proxies (made by `proxy`) on the port until signalled; return
    an exit code. `features(config, i)` is called in worker i (0-based) to add its filters
    and tasks; `ready()` once the ports are known to be free. A port in use raises
    ListenError."""
    shared: socket.socket | None = None
    if config.reuse_port:  # port 0: every worker takes the one the system gives here
        config.port = probe_port(config.host, config.port, "--listen")
    prepare = getattr(features, "prepare", None)
    if prepare is not None:  # checks its own ports; state the workers share is made here
        prepare(config)
    if not config.reuse_port:  # one socket made here (one accept queue)
        try:
            shared = listen_socket(config.host, config.port, False, config.backlog)
        except OSError as exc:
            raise ListenError.of(exc, config.host, config.port, "--listen") from None
        config.port = int(shared.getsockname()[1])
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until handled
    try:
        if ready is not None:
            ready()
        if config.workers <= 1:
            run_async(run_worker(config, filters, sock=shared, features=features, proxy=proxy))
            return 0
        return _supervise(config, filters, shared, features, proxy)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _supervise(
    config: ProxyConfig,
    filters: FilterFactory | None,
    shared: socket.socket | None,
    features: FeaturesFactory | None,
    proxy: ProxyFactory,
) -> int:
    """Fork the workers, restart those that die, pass SIGTERM and SIGINT on to them."""
    ctx = multiprocessing.get_context("fork")
    procs: list[multiprocessing.process.BaseProcess] = []
    stopping = False

    def start(i: int) -> multiprocessing.process.BaseProcess:
        p = ctx.Process(
            target=_worker_main,
            args=(config, filters, shared, features, i, proxy),
            name=f"lb-worker-{i}",
        )
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the child's too
        try:
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return p

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs.extend(start(i) for i in range(config.workers))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # every worker is in `procs`
    budget = RestartBudget(5 * config.workers)
    while True:
        live = [p for p in procs if p.exitcode is None]
        if not live:
            break
        wait([p.sentinel for p in live], timeout=1.0)
        if stopping:
            continue
        for i, p in enumerate(procs):
            if p.exitcode is not None:
                who = config.name.removeprefix("podkit ")
                print(
                    f"{who}: worker {i} (pid {p.pid}) exited with {p.exitcode}; restarting",
                    file=sys.stderr,
                    flush=True,
                )
                if not budget.allow():
                    print(f"{who}: workers keep dying; giving up", file=sys.stderr, flush=True)
                    on_signal(signal.SIGTERM, None)
                    break
                time.sleep(0.1)
                procs[i] = start(i)
    return 0


class RestartBudget:
    """At most `limit` worker restarts within any `window` seconds of `now()`: past
    that the workers keep dying and restarting them only hides it."""

    def __init__(
        self, limit: int, window: float = 10.0, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.now = now
        self._times: list[float] = []

    def allow(self) -> bool:
        """Count one restart; False when it is one too many."""
        t = self.now()
        self._times = [x for x in self._times if t - x < self.window] + [t]
        return len(self._times) <= self.limit


class TLSTermination:
    """What each worker of a TLS-terminating proxy adds: the certificate's context,
    reloaded when its files change (checked each second; a pair that does not load is
    logged and the last good one kept)."""

    filters: Sequence[Filter] = ()

    def __init__(
        self, cert: str | os.PathLike[str], key: str | os.PathLike[str], name: str
    ) -> None:
        from podkit.net.tls import ReloadingContext

        self._tls = ReloadingContext(cert, key, log=functools.partial(log, name))
        self.ssl: SSLContext | None = self._tls.context
        self._task: asyncio.Task[None] | None = None

    async def start(self, lb: Proxy) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tls.run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def tls_termination(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> FeaturesFactory:
    """`serve(..., features=tls_termination(cert, key))`: every worker speaks TLS."""
    return lambda config, index: TLSTermination(cert, key, config.name)
