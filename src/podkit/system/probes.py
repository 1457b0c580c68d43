"""Readiness and liveness probes: HTTP GET, TCP connect, or a command, with thresholds."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass

from podkit.aio import wait_for
from podkit.net.httpwrite import request_head
from podkit.system.spec import Probe


@dataclass
class ProbeState:
    """Counts consecutive results and flips `healthy` at the spec's thresholds."""

    success_threshold: int
    failure_threshold: int
    healthy: bool = False
    _streak: int = 0

    def record(self, ok: bool) -> bool:
        """Record one probe result; return True when `healthy` changed."""
        if ok == self.healthy:
            self._streak = 0
            return False
        self._streak += 1
        needed = self.success_threshold if ok else self.failure_threshold
        if self._streak >= needed:
            self.healthy = ok
            self._streak = 0
            return True
        return False


async def http_check(host: str, port: int, path: str, timeout: float) -> bool:
    """GET `path`; healthy on a 2xx or 3xx status."""

    async def attempt() -> bool:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            host_field = (b"Host", f"{host}:{port}".encode("latin-1"))
            fields = [host_field, (b"User-Agent", b"podkit-probe")]
            writer.write(request_head(b"GET", path.encode("latin-1"), fields, close=True))
            await writer.drain()
            status = await reader.readline()
        finally:
            writer.close()
        parts = status.split()
        return len(parts) >= 2 and parts[1][:1] in (b"2", b"3")

    try:
        return await wait_for(attempt(), timeout)
    except (OSError, TimeoutError, ValueError):
        return False


async def tcp_check(host: str, port: int, timeout: float) -> bool:
    """Healthy when a TCP connection opens."""
    try:
        _, writer = await wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def exec_check(
    command: list[str], env: Mapping[str, str], cwd: str | None, timeout: float
) -> bool:
    """Healthy when the command exits 0 within the timeout."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            env=dict(env),
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        return False
    try:
        return await wait_for(proc.wait(), timeout) == 0
    except TimeoutError:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        await proc.wait()
        return False


async def run_probe(
    probe: Probe,
    host: str,
    ports: Mapping[str, int],
    env: Mapping[str, str],
    cwd: str | None,
) -> bool:
    """Run one probe once against a container at `host`."""
    if probe.http is not None:
        port = probe.http.port
        number = ports[port] if isinstance(port, str) else port
        return await http_check(probe.http.host or host, number, probe.http.path, probe.timeout)
    if probe.tcp is not None:
        port = probe.tcp.port
        number = ports[port] if isinstance(port, str) else port
        return await tcp_check(host, number, probe.timeout)
    assert probe.exec is not None
    return await exec_check(list(probe.exec.command), env, cwd, probe.timeout)
