"""A FAKE Kubernetes API server for tests: only the coordination.k8s.io/v1 Lease
endpoints (get, create, replace), with resourceVersion conflict semantics: a PUT whose
metadata.resourceVersion is not the stored one gets 409 Conflict, like kube-apiserver.
No kube-apiserver can be installed on these machines; this stands in for it."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from typing import Any

from aiohttp import web

BASE = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"


def reply(body: dict[str, Any], code: int = 200) -> web.Response:
    """JSON with exactly `Content-Type: application/json`, as kube-apiserver sends it."""
    return web.Response(
        body=json.dumps(body).encode(), status=code, headers={"Content-Type": "application/json"}
    )


def status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip
    return reply(body, code)


class FakeKubeAPI:
    """Runs in its own thread and event loop; `url` is its address."""

    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions = itertools.count(1)
        self.conflicts = 0
        self.requests = 0
        self.down = False
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(BASE + "/{name}", self.get)
        app.router.add_post(BASE, self.create)
        app.router.add_put(BASE + "/{name}", self.replace)
        return app

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self._app())
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> FakeKubeAPI:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _gate(self) -> web.Response | None:
        self.requests += 1
        if self.down:
            return status(503, "ServiceUnavailable", "fake API server is down")
        return None

    async def get(self, request: web.Request) -> web.Response:
        if (r := self._gate()) is not None:
            return r
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.leases:
            return status(404, "NotFound", f'leases.coordination.k8s.io "{key[1]}" not found')
        return reply(self.leases[key])

    async def create(self, request: web.Request) -> web.Response:
        if (r := self._gate()) is not None:
            return r
        body = await request.json()
        ns = request.match_info["ns"]
        name = body["metadata"]["name"]
        if (ns, name) in self.leases:
            return status(
                409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists'
            )
        body["metadata"].update(namespace=ns, resourceVersion=str(next(self.versions)))
        body.setdefault("apiVersion", "coordination.k8s.io/v1")
        body.setdefault("kind", "Lease")
        self.leases[ns, name] = body
        return reply(body, 201)

    async def replace(self, request: web.Request) -> web.Response:
        if (r := self._gate()) is not None:
            return r
        body = await request.json()
        key = (request.match_info["ns"], request.match_info["name"])
        current = self.leases.get(key)
        if current is None:
            return status(404, "NotFound", f'leases.coordination.k8s.io "{key[1]}" not found')
        sent = body.get("metadata", {}).get("resourceVersion")
        if sent != current["metadata"]["resourceVersion"]:
            self.conflicts += 1
            return status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on leases.coordination.k8s.io "{key[1]}": '
                "the object has been modified; please apply your changes to the latest version",
            )
        body["metadata"].update(namespace=key[0], resourceVersion=str(next(self.versions)))
        self.leases[key] = body
        return reply(body)
