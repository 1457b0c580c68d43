"""A small JSON-over-HTTP/1.1 server for control and admin endpoints (GET only), on
`podkit.net.server.HTTPServer`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from podkit.net.server import HTTPServer, Request, Response

Handler = Callable[[], Awaitable[tuple[int, Any]] | tuple[int, Any]]
TEXT = b"text/plain; version=0.0.4; charset=utf-8"  # Prometheus exposition


class JSONServer:
    """Serves `GET <path>` from `routes`: each handler returns (status, body); a body of
    bytes goes out as text/plain, anything else as JSON. `/`, unless routed, lists the
    paths."""

    def __init__(self, routes: dict[str, Handler], host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes = routes
        self._http = HTTPServer(self._handle, host, port)

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
