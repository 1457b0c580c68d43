"""A small JSON-over-HTTP/1.1 server for control and admin endpoints (GET only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from podkit.aio import wait_for

Handler = Callable[[], Awaitable[tuple[int, Any]] | tuple[int, Any]]
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class JSONServer:
    """Serves `GET <path>` from `routes`: each handler returns (status, body); a body of
    bytes goes out as text/plain, anything else as JSON. `/`, unless routed, lists the
    paths."""

    def __init__(self, routes: dict[str, Handler], host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _answer(self, method: bytes, path: str) -> tuple[int, Any]:
        route = path.split("?", 1)[0]
        handler = self.routes.get(route)
        if handler is None:
            if route == "/":  # an index, for whoever tries the bare address
                return 200, {"paths": sorted(self.routes)}
            return 404, {"error": f"not found: {path}", "paths": sorted(self.routes)}
        if method not in (b"GET", b"HEAD"):
            return 405, {"error": "only GET is allowed"}
        result = handler()
        if not isinstance(result, tuple):
            result = await result
        return result

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                line = head.split(b"\r\n", 1)[0].split(b" ")
                if len(line) != 3:
                    status, body = 400, {"error": "malformed request line"}
                    keep = False
                else:
                    status, body = await self._answer(line[0], line[1].decode("latin-1"))
                    keep = b"connection: close" not in head.lower() and line[2] == b"HTTP/1.1"
                if isinstance(body, bytes):  # text as it is (Prometheus exposition)
                    data, ctype = body, "text/plain; version=0.0.4; charset=utf-8"
                else:
                    data, ctype = json.dumps(body).encode(), "application/json"
                writer.write(
                    f"HTTP/1.1 {status} {REASONS.get(status, 'Bad Request')}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                    f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
                if not keep:
                    return
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
