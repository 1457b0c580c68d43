"""The control endpoint of `podkit up` (loopback unless told otherwise) and the client
`podkit status` uses.

Besides `/status` (JSON) it serves `/metrics`: the process's own metrics and the
system's, read from the runtime at each scrape (`RuntimeCollector`); `/readyz` answers
200 once every replica is ready and every service routes, 503 before.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from podkit.observe.admin import AdminServer
from podkit.system.runtime import Runtime


def run_dir() -> Path:
    """Where running systems leave their control address: $PODKIT_RUN_DIR or a per-user dir."""
    return Path(os.environ.get("PODKIT_RUN_DIR") or f"/tmp/podkit-{os.getuid()}")


class RuntimeCollector(Collector):
    """The system's metrics, `podkit_up_*`, read from the runtime at each scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> list[Metric]:
        rt = self.runtime
        replicas = GaugeMetricFamily("podkit_up_replicas", "Replicas of each pod.", labels=["pod"])
        ready = GaugeMetricFamily(
            "podkit_up_ready_replicas", "Replicas whose containers are all ready.", labels=["pod"]
        )
        restarts = CounterMetricFamily(
            "podkit_up_container_restarts",
            "Restarts of each container, over the system's replicas.",
            labels=["pod", "container"],
        )
        counts: dict[str, list[int]] = {pod.name: [0, 0] for pod in rt.spec.pods}
        by_container: dict[tuple[str, str], int] = {}
        for rep in rt.replicas:
            counts[rep.pod.name][0] += 1
            counts[rep.pod.name][1] += rep.ready
            for c in rep.containers:
                key = (rep.pod.name, c.status.name)
                by_container[key] = by_container.get(key, 0) + c.status.restarts
        for name, (n, n_ready) in counts.items():
            replicas.add_metric([name], n)
            ready.add_metric([name], n_ready)
        for (name, container), n in sorted(by_container.items()):
            restarts.add_metric([name, container], n)
        endpoints = GaugeMetricFamily(
            "podkit_up_service_endpoints", "Ready endpoints of each service.", labels=["service"]
        )
        for svc in rt.spec.services:
            endpoints.add_metric([svc.name], len(rt.endpoints(svc)))
        scaled = CounterMetricFamily(
            "podkit_up_scale_events", "Changes of a pod's replica count by its hooks.",
            labels=["pod"],
        )  # fmt: skip
        for pod in rt.spec.pods:
            scaled.add_metric([pod.name], len([e for e in rt.scale_events if e[1] == pod.name]))
        up = GaugeMetricFamily("podkit_up_ready", "1 when the whole system is ready, else 0.")
        up.add_metric([], 1 if rt.ready() else 0)
        return [replicas, ready, restarts, endpoints, scaled, up]


class ControlServer:
    """Serves `/status` (JSON), `/metrics`, `/healthz` and `/readyz` for one runtime, and
    leaves its address in the run directory for `podkit status`."""

    def __init__(self, runtime: Runtime, host: str = "127.0.0.1", port: int = 0) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry()
        self.registry.register(RuntimeCollector(runtime))
        ProcessCollector(registry=self.registry)  # the process's own metrics
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.http = AdminServer(
            {
                "/status": lambda: (200, runtime.status()),
                "/readyz": lambda: (200 if runtime.ready() else 503, {"ready": runtime.ready()}),
            },
            host,
            port,
            registry=self.registry,
            name="podkit up",
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
