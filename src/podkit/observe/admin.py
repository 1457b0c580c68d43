"""The admin server every component runs: `AdminServer`, on `podkit.net.server`.

A route is a handler that takes nothing and answers GET and HEAD, or a `Route`: a
handler that reads the request (its query, its body) and the methods it allows. A
handler returns (status, body): bytes go out as text/plain, anything else as JSON.
Unless a component routes them itself, every admin server has `/metrics` (Prometheus
text format: the registry given, or the process's default one, which carries the
process and GC metrics of prometheus-client), `/healthz` and `/readyz` (200 while the
process serves), and `/` lists the paths. Connections are kept alive (a scraper reuses
one), and an answer to HEAD is the head alone.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from podkit.net.server import HTTPServer, Request, Response

Answer = tuple[int, Any]
Handler = Callable[[], Awaitable[Answer] | Answer]
TEXT = b"text/plain; version=0.0.4; charset=utf-8"  # Prometheus exposition
READ = (b"GET", b"HEAD")


@dataclass(frozen=True, slots=True)
class Route:
    """A handler given the request, and the methods it answers (others get a 405)."""

    handler: Callable[[Request], Awaitable[Answer] | Answer]
    methods: tuple[bytes, ...] = READ


def _ok() -> Answer:
    return 200, {"ok": True}


class AdminServer:
    """Serves the `routes` (path -> Handler or Route), and the default paths (see the
    module doc)."""

    def __init__(
        self,
        routes: Mapping[str, Handler | Route],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        registry: CollectorRegistry | None = None,
        name: str = "podkit admin",
    ) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self.routes: dict[str, Handler | Route] = {
            "/metrics": self._metrics,
            "/healthz": _ok,
            "/readyz": _ok,
            **routes,
        }
        self._http = HTTPServer(self._handle, host, port, name=name)

    def _metrics(self) -> Answer:
        return 200, generate_latest(self.registry)

    @property
    def host(self) -> str:
        return self._http.host

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        return self._http.url

    async def start(self) -> None:
        await self._http.start()

    async def _answer(self, req: Request) -> tuple[int, Any, tuple[bytes, ...]]:
        """(status, body, the methods the path allows) for one request."""
        path = req.path
        route = self.routes.get(path)
        if route is None:
            if path == "/":  # an index, for whoever tries the bare address
                return 200, {"paths": sorted(self.routes)}, READ
            return 404, {"error": f"not found: {path}", "paths": sorted(self.routes)}, ()
        methods = route.methods if isinstance(route, Route) else READ
        if req.method not in methods:
            allowed = ", ".join(m.decode() for m in methods)
            return 405, {"error": f"{path} allows {allowed} only"}, methods
        result = route.handler(req) if isinstance(route, Route) else route()
        if not isinstance(result, tuple):
            result = await result
        return result[0], result[1], methods

    async def _handle(self, req: Request) -> Response:
        status, body, methods = await self._answer(req)
        headers = [(b"Allow", b", ".join(methods))] if status == 405 else []
        if isinstance(body, bytes):
            return Response(status, body, TEXT, headers)
        return Response(status, json.dumps(body).encode(), headers=headers)

    async def close(self) -> None:
        await self._http.close()
