"""The admin server every component runs: `AdminServer`, on `podkit.net.server`.

Routes are GET only; a handler returns (status, body): bytes go out as text/plain,
anything else as JSON. Unless a component routes them itself, every admin server has
`/metrics` (Prometheus text format: the registry given, or the process's default one,
which carries the process and GC metrics of prometheus-client), `/healthz` and
`/readyz` (200 while the process serves), and `/` lists the paths.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from podkit.net.server import HTTPServer, Request, Response

Handler = Callable[[], Awaitable[tuple[int, Any]] | tuple[int, Any]]
TEXT = b"text/plain; version=0.0.4; charset=utf-8"  # Prometheus exposition


def _ok() -> tuple[int, Any]:
    return 200, {"ok": True}


class AdminServer:
    """Serves `GET <path>` from `routes`, and the default paths (see the module doc)."""

    def __init__(
        self,
        routes: dict[str, Handler],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        registry: CollectorRegistry | None = None,
        name: str = "podkit admin",
    ) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self.routes: dict[str, Handler] = {
            "/metrics": self._metrics,
            "/healthz": _ok,
            "/readyz": _ok,
            **routes,
        }
        self._http = HTTPServer(self._handle, host, port, name=name)

    def _metrics(self) -> tuple[int, Any]:
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

    async def _answer(self, method: bytes, path: str) -> tuple[int, Any]:
        handler = self.routes.get(path)
        if handler is None:
            if path == "/":  # an index, for whoever tries the bare address
                return 200, {"paths": sorted(self.routes)}
            return 404, {"error": f"not found: {path}", "paths": sorted(self.routes)}
        if method not in (b"GET", b"HEAD"):
            return 405, {"error": "only GET is allowed"}
        result = handler()
        if not isinstance(result, tuple):
            result = await result
        return result

    async def _handle(self, req: Request) -> Response:
        status, body = await self._answer(req.method, req.path)
        if isinstance(body, bytes):
            return Response(status, body, TEXT)
        return Response(status, json.dumps(body).encode())

    async def close(self) -> None:
        await self._http.close()
