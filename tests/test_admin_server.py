"""podkit.net.admin.JSONServer: routes, an index at /, 404 and 405 that list the paths."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from podkit.net.admin import JSONServer


def fetch(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


async def test_routes_index_and_errors() -> None:
    server = JSONServer(
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
        assert json.loads(body) == {"paths": ["/metrics", "/status"]}
        status, _, body = await asyncio.to_thread(fetch, server.url + "/nope")
        assert status == 404 and json.loads(body)["paths"] == ["/metrics", "/status"]
        status, _, _ = await asyncio.to_thread(fetch, server.url + "/status", "POST")
        assert status == 405
    finally:
        await server.close()
