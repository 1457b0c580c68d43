"""podkit.observe.admin.AdminServer: routes, the default /metrics, /healthz and /readyz,
an index at /, 404 and 405 that list the paths, a Route's query and methods, HEAD and
keep-alive on one connection."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

from podkit.net.server import Request
from podkit.observe.admin import AdminServer, Route


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


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes]]:
    """One answer's head from a kept-alive connection: status line and headers."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head[:-4].split(b"\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)}


async def test_one_connection_serves_a_head_then_gets_and_a_route_reads_its_query() -> None:
    """A scraper's kept-alive connection: HEAD answers the head alone (a body after it
    would be read as the next answer), then a GET and a POST; a Route sees the query and
    allows its own methods."""
    seen: list[str] = []

    def purge(req: Request) -> tuple[int, Any]:
        seen.append(req.query)
        return 200, {"purged": 1}

    server = AdminServer({"/purge": Route(purge, methods=(b"GET", b"POST"))})
    await server.start()
    reader, writer = await asyncio.open_connection(server.host, server.port)
    body = b""
    try:
        for method, target in (
            ("HEAD", "/metrics"),
            ("GET", "/healthz"),
            ("POST", "/purge?url=a%20b"),
        ):
            writer.write(
                f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
            )
            status, headers = await read_head(reader)
            assert status == b"HTTP/1.1 200 OK", (method, target, status)
            size = int(headers[b"content-length"])
            if method == "HEAD":
                assert size > 0 and headers[b"content-type"].startswith(b"text/plain")
                continue  # no body follows: the next answer starts right after the head
            body = await reader.readexactly(size)
        assert json.loads(body) == {"purged": 1} and seen == ["url=a%20b"]
        writer.write(b"HEAD /purge HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers = await read_head(reader)
        assert status.startswith(b"HTTP/1.1 405") and headers[b"allow"] == b"GET, POST"
    finally:
        writer.close()
        await server.close()
