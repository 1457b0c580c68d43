"""Each long-running component started with its admin port: /metrics parses with
prometheus-client's parser and carries the component's own figures where it keeps any,
/healthz answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import free_port

PODKIT = [sys.executable, "-m", "podkit"]
_open = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


def argv(component: str, admin: int, tmp: Path) -> list[str]:
    """The component's command line, its admin server on `admin`."""
    listen = f"127.0.0.1:{free_port()}"
    if component == "lb":
        return ["lb", "--listen", listen, "--upstream", "127.0.0.1:1", "--admin-port", str(admin)]
    if component == "sidecar tls":
        return ["sidecar", "tls", "--upstream", "1", "--listen", listen, "--self-signed",
                "--admin-port", str(admin)]  # fmt: skip
    if component == "sidecar config":
        (tmp / "app.conf").write_text("a = 1\n")
        return ["sidecar", "config", "--source", str(tmp / "app.conf"), "--path",
                str(tmp / "out.conf"), "--admin-port", str(admin)]  # fmt: skip
    if component == "ambassador broker":
        return ["ambassador", "broker", "--service", "db", "--listen", str(free_port()),
                "--endpoint", "127.0.0.1:1", "--admin-port", str(admin)]  # fmt: skip
    if component == "ambassador split":
        return ["ambassador", "split", "--arm", "a=127.0.0.1:1", "--listen", listen,
                "--admin-port", str(admin)]  # fmt: skip
    if component == "elect":
        return ["elect", "--backend", f"sqlite:///{tmp / 'e.db'}", "--name", "n",
                "--port", str(admin)]  # fmt: skip
    if component == "adapter health":
        return ["adapter", "health", "--command", "true", "--port", str(admin)]
    if component == "adapter logs":
        return ["adapter", "logs", "--file", str(tmp / "app.log"), "--admin-port", str(admin)]
    if component == "queue work":
        return ["queue", "work", "--queue", f"sqlite:///{tmp / 'q.db'}", "--exec", "true",
                "--admin-port", str(admin)]  # fmt: skip
    if component == "up":
        (tmp / "s.yaml").write_text(SPEC)
        return ["up", str(tmp / "s.yaml"), "--admin-port", str(admin)]
    if component == "queue scaler":
        return ["queue", "scaler", "--queue", f"sqlite:///{tmp / 'q.db'}", "--port", str(admin)]
    raise ValueError(component)


# the component's own metric that must be there (None: only the process's)
OWN = {
    "lb": "podkit_lb_upstream_available",
    "sidecar tls": "podkit_sidecar_tls_tries",
    "sidecar config": None,
    "ambassador broker": None,
    "ambassador split": "podkit_ambassador_split_weight",
    "elect": None,
    "adapter health": None,
    "adapter logs": "podkit_adapter_logs_lines_read",
    "queue scaler": "podkit_queue_scaler_",
    "queue work": "podkit_queue_work_items_done",
    "up": "podkit_up_replicas",
}

SPEC = f"""
name: admin-up
pods:
  - name: sleeper
    replicas: 2
    containers:
      - name: app
        command: [{sys.executable}, -c, "import time; time.sleep(60)"]
"""


def get(url: str) -> tuple[int, bytes]:
    try:
        with _open(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("component", sorted(OWN))
def test_the_admin_port_serves_metrics_and_health(component: str, tmp_path: Path) -> None:
    admin = free_port()
    proc = subprocess.Popen(
        [*PODKIT, *argv(component, admin, tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                status, body = get(f"http://127.0.0.1:{admin}/metrics")
                break
            except OSError:
                assert time.monotonic() < deadline, f"{component}: no admin server on {admin}"
                time.sleep(0.1)
        assert status == 200, body
        families = {f.name for f in text_string_to_metric_families(body.decode())}
        assert families, body
        own = OWN[component]
        if own is not None:
            assert any(name.startswith(own) for name in families), sorted(families)
        status, body = get(f"http://127.0.0.1:{admin}/healthz")
        data = json.loads(body)  # the adapter's own /healthz says "status", the rest "ok"
        assert status == 200 and (data.get("ok") is True or data.get("status") == "ok"), body
    finally:
        proc.terminate()
        proc.wait(10)


def test_podkit_up_reports_its_replicas_and_readiness(tmp_path: Path) -> None:
    admin = free_port()
    proc = subprocess.Popen(
        [*PODKIT, *argv("up", admin, tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None
            try:
                status, _ = get(f"http://127.0.0.1:{admin}/readyz")
            except OSError:
                status = 0
            if status == 200:
                break
            assert time.monotonic() < deadline, f"not ready: {status}"
            time.sleep(0.1)
        _, body = get(f"http://127.0.0.1:{admin}/metrics")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode())
            for s in f.samples
        }
        assert samples[("podkit_up_replicas", (("pod", "sleeper"),))] == 2
        assert samples[("podkit_up_ready_replicas", (("pod", "sleeper"),))] == 2
        assert samples[("podkit_up_ready", ())] == 1
        key = ("podkit_up_container_restarts_total", (("container", "app"), ("pod", "sleeper")))
        assert samples[key] == 0
    finally:
        proc.terminate()
        proc.wait(15)
