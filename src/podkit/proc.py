"""Child processes that cannot outlive their parent (used by the runtime and components).

Every container runs in its own process group with a parent-death signal; a watchdog
process holds a pipe to the supervisor and, when that pipe closes (even on kill -9),
terminates every process group it was told about.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from podkit.aio import wait_for

PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` that asks the kernel to send `sig` when the parent dies."""
    parent = os.getpid()

    def preexec() -> None:
        if _LIBC is not None and sys.platform.startswith("linux"):
            _LIBC.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


async def stop_group(proc: asyncio.subprocess.Process, grace: float) -> bool:
    """SIGTERM to `proc`'s process group, SIGKILL after `grace` seconds; wait for it.
    True when it had to be killed."""
    if proc.returncode is not None:
        return False
    signal_group(proc.pid, signal.SIGTERM)
    try:
        await wait_for(asyncio.shield(proc.wait()), grace)
        return False
    except TimeoutError:
        signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        return True


class Watchdog:
    """A helper process that kills the registered process groups when we die."""

    def __init__(self, grace: float = 2.0) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "podkit.system.watchdog", str(os.getpid()), str(grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        assert self._proc.stdin is not None
        self._pipe = self._proc.stdin

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, line: str) -> None:
        try:
            self._pipe.write(line.encode() + b"\n")
            self._pipe.flush()
        except (BrokenPipeError, ValueError):
            pass

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unwatch(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def close(self) -> None:
        """Release the watchdog after a clean shutdown (nothing left to kill)."""
        self._send("exit")
        try:
            self._pipe.close()
        except BrokenPipeError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
