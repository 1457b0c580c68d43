"""examples/legacy-https.yaml under `podkit up`: a plain-HTTP app answers over HTTPS
through the TLS sidecar, and its JSON /stats reads as Prometheus metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import free_port, podkit_up

EXAMPLES = Path(__file__).parent.parent / "examples"


def fetch(url: str, ctx: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
        return str(r.read().decode())


def test_legacy_app_is_served_over_https_with_metrics(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "legacy", tmp_path / "legacy")
    https, metrics = free_port(), free_port()
    text = (EXAMPLES / "legacy-https.yaml").read_text()
    text = text.replace("port: 8443\n", f"port: {https}\n")
    text = text.replace("port: 9187\n    pods", f"port: {metrics}\n    pods")
    spec = tmp_path / "legacy-https.yaml"
    spec.write_text(text)
    log = tmp_path / "up.log"
    proc = podkit_up(spec, log, tmp_path / "run")
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE  # --self-signed: the example's certificate
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                body = fetch(f"https://127.0.0.1:{https}/hello", insecure)
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        assert '"seen_as": "https"' in body and '"path": "/hello"' in body
        fetch(f"https://127.0.0.1:{https}/again", insecure)
        with pytest.raises(OSError):  # plain HTTP is not spoken on that port
            fetch(f"http://127.0.0.1:{https}/hello")
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(fetch(f"http://127.0.0.1:{metrics}/metrics"))
            for s in f.samples
        }
        assert values["legacy_requests_total", (("method", "GET"),)] >= 2
        assert values["podkit_adapter_up", (("source", "json"),)] == 1.0
        # the HTTPS service is advertised as https://, in the log and by `podkit status`
        ready = f"legacy is ready: try https://127.0.0.1:{https}/, http://127.0.0.1:{metrics}/"
        while ready not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        assert f"service legacy: https://127.0.0.1:{https}/ -> legacy" in log.read_text()
        status = subprocess.run(
            [sys.executable, "-m", "podkit", "status", "legacy", "--json"],
            capture_output=True,
            text=True,
            env=dict(os.environ, PODKIT_RUN_DIR=str(tmp_path / "run")),
            timeout=30,
            check=True,
        )
        urls = {s["name"]: s["url"] for s in json.loads(status.stdout)["services"]}
        assert urls == {
            "legacy": f"https://127.0.0.1:{https}/",
            "legacy-metrics": f"http://127.0.0.1:{metrics}/",
        }
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
