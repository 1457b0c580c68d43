"""Readiness and liveness probes: HTTP GET, TCP connect, or a command, with thresholds."""

from __future__ import annotations

import asyncio
import contextlib
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


Result = tuple[bool, str]  # healthy, and why not (empty when healthy)


def _failure(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__


async def http_check(host: str, port: int, path: str, timeout: float) -> Result:
    """GET `path`; healthy on a 2xx or 3xx status."""

    async def attempt() -> Result:
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
        if len(parts) < 2:
            return False, f"GET {path}: no HTTP answer"
        ok = parts[1][:1] in (b"2", b"3")
        return ok, "" if ok else f"GET {path}: HTTP {parts[1].decode('latin-1')}"

    try:
        return await wait_for(attempt(), timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        return False, f"GET http://{host}:{port}{path}: {_failure(exc, timeout)}"


async def tcp_check(host: str, port: int, timeout: float) -> Result:
    """Healthy when a TCP connection opens."""
    try:
        _, writer = await wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return False, f"TCP {host}:{port}: {_failure(exc, timeout)}"
    writer.close()
    return True, ""


async def exec_check(
    command: list[str], env: Mapping[str, str], cwd: str | None, timeout: float
) -> Result:
    """Healthy when the command exits 0 within the timeout; else its exit code and the
    tail of its output."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            env=dict(env),
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return False, f"{command[0]}: {exc.strerror or exc}"
    try:
        out, _ = await wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        return False, f"{command[0]}: still running after {timeout:g}s"
    if proc.returncode == 0:
        return True, ""
    tail = out.decode("utf-8", "replace").strip()[-200:]
    return False, f"{command[0]}: exit {proc.returncode}" + (f": {tail}" if tail else "")


async def run_probe(
    probe: Probe,
    host: str,
    ports: Mapping[str, int],
    env: Mapping[str, str],
    cwd: str | None,
) -> Result:
    """Run one probe once against a container at `host`: (healthy, why not)."""
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
