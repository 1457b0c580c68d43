"""`podkit up`: load a spec, run it until SIGINT/SIGTERM, shut down cleanly."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from podkit.system.control import ControlServer
from podkit.system.runtime import LogSink, Runtime
from podkit.system.spec import load_spec


async def run_up(
    spec_path: Path,
    *,
    subnet: str | None = None,
    log: LogSink | None = None,
    admin: tuple[str, int] = ("127.0.0.1", 0),
) -> int:
    """Run the system in `spec_path` until asked to stop, its control and admin endpoints
    on `admin` (host, port); return an exit code."""
    spec = load_spec(spec_path)
    runtime = Runtime(spec, base_dir=spec_path.parent, subnet=subnet, log=log)
    loop = asyncio.get_running_loop()
    stop_requests = 0
    stopping: list[asyncio.Task[None]] = []

    def request_stop() -> None:
        nonlocal stop_requests
        stop_requests += 1
        if stop_requests == 1:
            stopping.append(loop.create_task(runtime.stop()))
        else:
            runtime.log.event("second stop request: killing every container now")
            runtime.force_kill()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request_stop)
    control = ControlServer(runtime, *admin)
    try:
        try:
            await control.start()
        except OSError as exc:
            raise RuntimeError(f"--admin-port {admin[1]}: {exc.strerror or exc}") from None
        await runtime.start()
        runtime.log.event(
            f"{spec.name}: {len(runtime.replicas)} pod replicas; control {control.url}"
        )
        for svc in spec.services:
            runtime.log.event(f"service {svc.name}: {spec.service_url(svc)} -> {svc.pods}")
        await runtime.wait()
    finally:
        await control.close()
        if not runtime._stopped.is_set():
            await runtime.stop()
        runtime.log.close()
    return 0
