"""The control endpoint of `podkit up` (loopback only) and the client `podkit status` uses."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from podkit.observe.admin import AdminServer
from podkit.system.runtime import Runtime


def run_dir() -> Path:
    """Where running systems leave their control address: $PODKIT_RUN_DIR or a per-user dir."""
    return Path(os.environ.get("PODKIT_RUN_DIR") or f"/tmp/podkit-{os.getuid()}")


class ControlServer:
    """Serves `GET /status` (JSON) and `GET /healthz` for one runtime on 127.0.0.1, and
    leaves its address in the run directory for `podkit status`."""

    def __init__(self, runtime: Runtime, host: str = "127.0.0.1", port: int = 0) -> None:
        self.runtime = runtime
        self.http = AdminServer(
            {"/status": lambda: (200, runtime.status()), "/healthz": lambda: (200, {"ok": True})},
            host,
            port,
        )
        self.file: Path | None = None

    @property
    def url(self) -> str:
        return self.http.url

    async def start(self) -> None:
        await self.http.start()
        directory = run_dir()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.file = directory / f"{self.runtime.spec.name}.json"
        tmp = self.file.with_suffix(".tmp")
        info = {"name": self.runtime.spec.name, "pid": os.getpid(), "control": self.url}
        tmp.write_text(json.dumps(info))
        tmp.replace(self.file)

    async def close(self) -> None:
        await self.http.close()
        if self.file is not None:
            with contextlib.suppress(OSError):
                info = json.loads(self.file.read_text())
                if info.get("pid") == os.getpid():
                    self.file.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_systems() -> list[dict[str, Any]]:
    """The run files of systems whose `podkit up` is still alive (stale files are removed)."""
    out = []
    directory = run_dir()
    if not directory.is_dir():
        return []
    for file in sorted(directory.glob("*.json")):
        try:
            info = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if not _alive(int(info.get("pid", 0))):
            with contextlib.suppress(OSError):
                file.unlink()
            continue
        out.append(info)
    return out


def fetch_status(control_url: str, timeout: float = 3.0) -> dict[str, Any]:
    """GET the status of a running system from its control endpoint."""
    with urllib.request.urlopen(control_url + "/status", timeout=timeout) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data
