"""examples/replicated-service.yaml under `podkit up`: three replicas behind `podkit lb`
(the spec's `lb:`), with its cache, rate limit, admin port and membership from readiness."""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from support import free_port, podkit_up

EXAMPLES = Path(__file__).parent.parent / "examples"


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_replicated_service_caches_limits_and_follows_replicas(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "replicated", tmp_path / "replicated")
    port, admin = free_port(), free_port()
    text = (EXAMPLES / "replicated-service.yaml").read_text()
    text = text.replace("port: 8002", f"port: {port}").replace(
        "admin_port: 9902", f"admin_port: {admin}"
    )
    spec = tmp_path / "replicated-service.yaml"
    spec.write_text(text)
    log = tmp_path / "up.log"
    proc = podkit_up(spec, log, tmp_path / "run")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while "replicated is ready" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        # ready means the balancer routes to the replicas: the next request is answered
        status, _, body = get(f"{base}/healthz")
        assert status == 200, (body, log.read_text()[-3000:])
        # the cache: the first /products is fetched, the next ones are hits (max-age=10)
        first = get(f"{base}/products")
        second = get(f"{base}/products")
        assert (first[0], first[1].get("X-Cache")) == (200, "MISS")
        assert (second[0], second[1].get("X-Cache")) == (200, "HIT")
        assert json.loads(first[2])["at"] == json.loads(second[2])["at"]  # the same answer
        # the cart is private: never a hit
        assert get(f"{base}/cart")[1].get("X-Cache") != "HIT"
        # all three replicas are members and take traffic
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
            state = json.load(r)
        assert len(state["upstreams"]) == 3
        assert all(u["state"] == "healthy" for u in state["upstreams"])
        # the rate limit (10/s, burst 20, per client IP): 429 with Retry-After
        codes = [get(f"{base}/cart") for _ in range(40)]
        limited = [c for c in codes if c[0] == 429]
        assert limited and int(limited[0][1]["Retry-After"]) >= 1
        assert sum(c[0] == 200 for c in codes) <= 20 + 10 * 2  # burst + refill while sending
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert "lb/catalogue" in log.read_text()
