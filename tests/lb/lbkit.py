"""Helpers for the feature tests of `podkit lb`: a counting backend, a balancer with
features in the test's loop, raw HTTP over a socket."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from podkit.lb.balancer import LoadBalancer
from podkit.lb.features import Features, Worker
from podkit.net.proxy.engine import ProxyConfig


@dataclass
class Backend:
    name: str
    port: int = 0
    runner: web.AppRunner | None = None
    hits: Counter[str] = field(default_factory=Counter)
    healthy: bool = True
    failing: bool = False  # every answer but /healthz is a 500
    delay: float = 0.0  # seconds before every answer but /healthz

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _app(b: Backend) -> web.Application:
    async def any_path(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/healthz":
            b.hits[path] += 1
            return web.Response(status=200 if b.healthy else 503, text="ok")
        b.hits[path] += 1
        if request.method == "POST":
            await request.read()
        if b.delay:
            await asyncio.sleep(b.delay)
        if b.failing:
            return web.Response(status=500, text="broken")
        if path == "/slow":
            await asyncio.sleep(float(request.query.get("s", "1")))
        if path == "/headers":
            return web.json_response(dict(request.headers))
        headers = {"X-Backend": b.name}
        if path.startswith("/cached"):
            await asyncio.sleep(float(request.query.get("s", "0")))
            headers["Cache-Control"] = "max-age=60"
        elif path == "/vary":
            headers["Cache-Control"] = "max-age=60"
            headers["Vary"] = "Accept-Language"
            lang = request.headers.get("Accept-Language", "-")
            return web.Response(text=f"{b.name}:{lang}", headers=headers)
        elif path == "/nostore":
            headers["Cache-Control"] = "no-store"
        elif path == "/big":
            headers["Cache-Control"] = "max-age=60"
            resp = web.StreamResponse(headers=headers)
            await resp.prepare(request)  # chunked
            for _ in range(4):
                await resp.write(b"x" * 1000)
            await resp.write_eof()
            return resp
        return web.Response(text=f"{b.name}:{b.hits[path]}", headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    return app


async def start_backend(name: str, port: int = 0) -> Backend:
    b = Backend(name)
    runner = web.AppRunner(_app(b), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    b.runner = runner
    b.port = runner.addresses[0][1]
    return b


@asynccontextmanager
async def balancer(
    features: Features, upstreams: list[str], **config: Any
) -> AsyncIterator[tuple[LoadBalancer, Worker]]:
    """A LoadBalancer with `features` on a free port, in this loop."""
    policy = {k: config.pop(k) for k in ("policy_name", "hash_on") if k in config}
    cfg = ProxyConfig(upstreams=upstreams, port=0, tick=0.05, **config)
    worker = features(cfg, 0)
    lb = LoadBalancer(cfg, filters=worker.filters, **policy)
    await lb.start(ssl=worker.ssl)
    await worker.start(lb)
    try:
        yield lb, worker
    finally:
        await lb.close(0.5)
        await worker.close()


@asynccontextmanager
async def backends(n: int) -> AsyncIterator[list[Backend]]:
    bs = [await start_backend(f"b{i}") for i in range(n)]
    try:
        yield bs
    finally:
        for b in bs:
            await b.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def request(
    port: int,
    target: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    local: str | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> Answer:
    """One request on a fresh connection (from address `local` when given)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        local_addr=(local, 0) if local else None,
        ssl=tls,
        server_hostname="localhost" if tls else None,
    )
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        data = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    first, *rest = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in rest:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    if hdrs.get("transfer-encoding") == "chunked":
        out, pos = b"", 0
        while True:
            end = body.index(b"\r\n", pos)
            size = int(body[pos:end], 16)
            if size == 0:
                break
            out += body[end + 2 : end + 2 + size]
            pos = end + 4 + size
        body = out
    return Answer(int(first.split(" ")[1]), hdrs, body)


async def admin_json(port: int, target: str, method: str = "GET") -> Any:
    ans = await request(port, target, method)
    assert ans.status == 200, ans
    return json.loads(ans.body)
