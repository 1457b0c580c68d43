"""A policy of one's own gets what `podkit lb` has: worker processes on one port, TLS,
active health checks and the admin port, through `serve(..., proxy=...)`."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from podkit.net.tls import self_signed
from support import TinyHTTP, free_port, free_ports

PROGRAM = textwrap.dedent(
    """
    import sys
    from functools import partial
    from podkit.lb.balancer import LoadBalancer
    from podkit.lb.features import Features
    from podkit.net.proxy.config import proxy_config
    from podkit.net.proxy.workers import serve

    class LastAvailable:
        '''Always the last upstream listed that takes requests.'''
        name = "last-available"

        def __init__(self):
            self.upstreams = []

        def set_upstreams(self, upstreams):
            self.upstreams = list(upstreams)

        def pick(self, head, client, exclude=None):
            for u in reversed(self.upstreams):
                if u.available and not (exclude and u in exclude):
                    return u
            return None

    port, admin, cert, key, *upstreams = sys.argv[1:]
    config = proxy_config(f"127.0.0.1:{port}", upstreams, workers=2, scheme="https",
                          name="podkit custom")
    features = Features(health_path="/healthz", health_interval=0.2, healthy_threshold=1,
                        unhealthy_threshold=1, tls_cert=cert, tls_key=key,
                        admin_port=int(admin))
    sys.exit(serve(config, features=features,
                   proxy=partial(LoadBalancer, policy=LastAvailable())))
    """
)


def test_a_custom_policy_gets_workers_tls_health_checks_and_admin(tmp_path: Path) -> None:
    healthy = {"a": True, "b": True}

    def replica(name: str) -> TinyHTTP:
        def answer(path: str) -> tuple[int, bytes]:
            if path == "/healthz":
                return (200 if healthy[name] else 503), b"ok"
            return 200, name.encode()

        return TinyHTTP(answer)

    a, b = replica("a"), replica("b")
    cert, key = self_signed(str(tmp_path), ["localhost", "127.0.0.1"])
    script = tmp_path / "custom.py"
    script.write_text(PROGRAM)
    port, admin = free_port(), free_ports(2)  # worker i's admin: admin + i
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), str(admin), str(cert), str(key), a.url, b.url],
        stderr=subprocess.PIPE,
        text=True,
    )
    tls = ssl.create_default_context(cafile=str(cert))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls)
    )

    def get(url: str) -> tuple[int, str]:
        try:
            with opener.open(url, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def until(check: object, what: str) -> None:
        deadline = time.monotonic() + 20
        while not check():  # type: ignore[operator]
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    base = f"https://localhost:{port}/"
    try:

        def serving() -> bool:
            try:
                return get(base)[0] == 200
            except OSError:
                return False

        until(serving, "no HTTPS answer")
        # once every worker's first health checks are in: the policy's choice, over TLS
        until(lambda: all(get(base)[1] == "b" for _ in range(10)), "b is not chosen")
        assert {get(base)[1] for _ in range(40)} == {"b"}
        healthy["b"] = False  # the active checks eject b in every worker
        until(lambda: all(get(base)[1] == "a" for _ in range(10)), "b was not ejected")
        for worker in (0, 1):  # each worker's admin port, admin_port + i
            with opener.open(f"http://127.0.0.1:{admin + worker}/metrics", timeout=2) as r:
                text = r.read().decode()
            up = {
                s.labels["upstream"]: s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "podkit_lb_upstream_available"
            }
            assert up == {"127.0.0.1:" + a.url.rsplit(":", 1)[1]: 1.0,
                          "127.0.0.1:" + b.url.rsplit(":", 1)[1]: 0.0}  # fmt: skip
        with opener.open(f"http://127.0.0.1:{admin}/status", timeout=2) as r:
            assert json.load(r)["policy"] == "last-available"
    finally:
        proc.terminate()
        proc.wait(10)
        a.close()
        b.close()
