"""podkit.observe.admin.AdminServer: routes, the default /metrics, /healthz and /readyz,
an index at /, 404 and 405 that list the paths."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from podkit.observe.admin import AdminServer


def fetch(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


async def test_routes_index_and_errors() -> None:
    server = AdminServer(
        {"/metrics": lambda: (200, b"up 1\n"), "/status": lambda: (503, {"ok": False})}
    )
    await server.start()
    try:
        got = await asyncio.to_thread(fetch, server.url + "/metrics")
        assert got[0] == 200 and got[1].startswith("text/plain") and got[2] == b"up 1\n"
        status, ctype, body = await asyncio.to_thread(fetch, server.url + "/status")
        assert (status, json.loads(body)) == (503, {"ok": False})
        status, ctype, body = await asyncio.to_thread(fetch, server.url + "/?x=1")
        assert (status, ctype) == (200, "application/json")
        paths = ["/healthz", "/metrics", "/readyz", "/status"]
        assert json.loads(body) == {"paths": paths}
        status, _, body = await asyncio.to_thread(fetch, server.url + "/nope")
        assert status == 404 and json.loads(body)["paths"] == paths
        status, _, _ = await asyncio.to_thread(fetch, server.url + "/status", "POST")
        assert status == 405
    finally:
        await server.close()


async def test_every_admin_server_has_metrics_and_health() -> None:
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    Counter("podkit_test_things", "Things.", registry=registry).inc(3)
    server = AdminServer({"/status": lambda: (200, {"ok": True})}, registry=registry)
    await server.start()
    try:
        status, ctype, body = await asyncio.to_thread(fetch, server.url + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        samples = {
            s.name: s.value
            for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples
        }
        assert samples["podkit_test_things_total"] == 3.0
        for path in ("/healthz", "/readyz"):
            status, _, body = await asyncio.to_thread(fetch, server.url + path)
            assert (status, json.loads(body)) == (200, {"ok": True})
    finally:
        await server.close()
