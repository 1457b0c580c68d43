"""`podkit sidecar tls`: HTTPS in front of a plain-HTTP app, checked with Python's ssl:
forwarded headers, keep-alive, WebSocket, certificate reload, bad input and a dead app."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from podkit.net.tls import self_signed
from support import free_port

PODKIT = [sys.executable, "-m", "podkit"]


async def app_server() -> tuple[web.AppRunner, int]:
    """The legacy app: plain HTTP, echoes what the sidecar told it, and a WebSocket echo."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({
            "path": request.path_qs,
            "xff": request.headers.get("X-Forwarded-For"),
            "proto": request.headers.get("X-Forwarded-Proto"),
            "peer": request.transport.get_extra_info("peername")[1] if request.transport else 0,
        })  # fmt: skip

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            await sock.send_str(msg.data[::-1])
        return sock

    app = web.Application()
    app.add_routes([web.get("/ws", ws), web.get("/{tail:.*}", echo)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, "the sidecar exited"
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the sidecar never listened"
            await asyncio.sleep(0.05)


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[tuple[int, int, Path, web.AppRunner]]:
    runner, app_port = await app_server()
    live = tmp_path / "live"
    cert, key = self_signed(live, ["localhost", "127.0.0.1"])
    port = free_port()
    proc = subprocess.Popen(
        [*PODKIT, "sidecar", "tls", "--upstream", str(app_port), "--listen",
         f"127.0.0.1:{port}", "--cert", str(cert), "--key", str(key)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_listening(port, proc)
        yield port, app_port, live, runner
    finally:
        proc.terminate()
        proc.wait(10)
        await runner.cleanup()


def client_ctx(cafile: Path, **kw: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


async def test_https_request_keep_alive_and_forwarded_headers(
    sidecar: tuple[int, int, Path, web.AppRunner],
) -> None:
    port, _, live, _ = sidecar
    ctx = client_ctx(live / "cert.pem")
    conn = aiohttp.TCPConnector(ssl=ctx, limit=1)
    async with aiohttp.ClientSession(connector=conn) as s:
        peers = set()
        for i in range(3):
            async with s.get(f"https://127.0.0.1:{port}/orders?n={i}") as r:
                data = await r.json()
            assert data["path"] == f"/orders?n={i}"
            assert (data["xff"], data["proto"]) == ("127.0.0.1", "https")
            peers.add(data["peer"])
        assert len(peers) == 1  # one upstream connection, kept alive
        assert len(conn._conns) == 1  # type: ignore[attr-defined]  # and one client connection
        async with s.ws_connect(f"wss://127.0.0.1:{port}/ws") as ws:
            await ws.send_str("podkit")
            assert (await ws.receive(timeout=5)).data == "tikdop"


async def test_only_tls12_and_up_with_aead_ciphers(
    sidecar: tuple[int, int, Path, web.AppRunner],
) -> None:
    port, _, live, _ = sidecar
    _, w = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx(live / "cert.pem"), server_hostname="localhost"
    )
    assert w.get_extra_info("ssl_object").version() == "TLSv1.3"
    w.close()
    with pytest.warns(DeprecationWarning):
        old = client_ctx(live / "cert.pem", minimum_version=ssl.TLSVersion.TLSv1,
                         maximum_version=ssl.TLSVersion.TLSv1_1)  # fmt: skip
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match="alert protocol version"):
        await asyncio.open_connection("127.0.0.1", port, ssl=old, server_hostname="localhost")
    tls12 = client_ctx(live / "cert.pem", maximum_version=ssl.TLSVersion.TLSv1_2)
    _, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls12, server_hostname="localhost")
    sslobj = w.get_extra_info("ssl_object")
    assert sslobj.version() == "TLSv1.2" and sslobj.cipher()[0].startswith("ECDHE-ECDSA-AES")
    w.close()
    cbc = client_ctx(live / "cert.pem", maximum_version=ssl.TLSVersion.TLSv1_2)
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA")  # CBC with SHA-1: refused
    with pytest.raises(ssl.SSLError, match="handshake failure"):
        await asyncio.open_connection("127.0.0.1", port, ssl=cbc, server_hostname="localhost")


async def test_a_renewed_certificate_is_served_without_a_restart(
    sidecar: tuple[int, int, Path, web.AppRunner], tmp_path: Path
) -> None:
    port, _, live, _ = sidecar
    old_cert = tmp_path / "old.pem"
    shutil.copy(live / "cert.pem", old_cert)
    new_cert, new_key = self_signed(tmp_path / "new", ["localhost", "127.0.0.1"])
    for src, name in ((new_key, "key.pem"), (new_cert, "cert.pem")):
        shutil.copy(src, live / f".{name}")
        os.replace(live / f".{name}", live / name)
    deadline = time.monotonic() + 5
    while True:  # reloaded within the sidecar's 1 s check
        try:
            _, w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx(new_cert), server_hostname="localhost"
            )
            w.close()
            break
        except ssl.SSLCertVerificationError:
            assert time.monotonic() < deadline, "the new certificate was never served"
            await asyncio.sleep(0.1)


async def test_malformed_requests_get_400_and_the_sidecar_keeps_serving(
    sidecar: tuple[int, int, Path, web.AppRunner],
) -> None:
    port, _, live, _ = sidecar
    ctx = client_ctx(live / "cert.pem")
    smuggle = (
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for bad in (b"GARBAGE\r\n\r\n", smuggle, b"\x00\xff" * 100 + b"\r\n\r\n"):
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        w.write(bad)
        answer = await asyncio.wait_for(r.read(), 5)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
        assert b"\r\n\r\npodkit sidecar tls: " in answer
        w.close()
    async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{port}/ok", ssl=ctx) as r:
        assert r.status == 200


async def test_a_dead_app_gets_502_with_a_clear_body(
    sidecar: tuple[int, int, Path, web.AppRunner],
) -> None:
    port, app_port, live, runner = sidecar
    await runner.cleanup()
    ctx = client_ctx(live / "cert.pem")
    async with aiohttp.ClientSession() as s, s.get(f"https://127.0.0.1:{port}/x", ssl=ctx) as r:
        body = await r.text()
    assert r.status == 502
    assert f"127.0.0.1:{app_port}" in body and body.startswith("podkit sidecar tls: ")


def test_a_certificate_that_does_not_load_is_named_and_why(tmp_path: Path) -> None:
    text = tmp_path / "hostname"
    text.write_text("web-1\n")
    out = subprocess.run(
        [*PODKIT, "sidecar", "tls", "--upstream", "1", "--listen", f"127.0.0.1:{free_port()}",
         "--cert", str(text), "--key", str(text)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert f"--cert, --key: {text} holds no PEM certificate" in out.stderr


async def test_port_0_serves_every_worker_on_the_port_it_prints() -> None:
    runner, app_port = await app_server()
    proc = subprocess.Popen(
        [*PODKIT, "sidecar", "tls", "--upstream", str(app_port), "--listen", "127.0.0.1:0",
         "--self-signed", "--workers", "2"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 20)
        url = line.split()[2]  # sidecar tls: https://127.0.0.1:N -> http://...
        assert url.startswith("https://127.0.0.1:") and not url.endswith(":0"), line
        port = int(url.rsplit(":", 1)[1])
        await wait_listening(port, proc)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        for _ in range(8):  # fresh connections, spread over both workers
            conn = aiohttp.TCPConnector(ssl=ctx, force_close=True)
            async with aiohttp.ClientSession(connector=conn) as s, s.get(f"{url}/p") as r:
                assert r.status == 200 and (await r.json())["proto"] == "https"
    finally:
        proc.terminate()
        proc.wait(10)
        await runner.cleanup()


async def test_the_admin_port_serves_metrics_per_worker(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    runner, app_port = await app_server()
    cert, key = self_signed(tmp_path, ["localhost", "127.0.0.1"])
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [*PODKIT, "sidecar", "tls", "--upstream", str(app_port), "--listen",
         f"127.0.0.1:{port}", "--cert", str(cert), "--key", str(key),
         "--admin-port", str(admin)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_listening(port, proc)
        await wait_listening(admin, proc)
        ctx = client_ctx(cert)
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.get(f"https://127.0.0.1:{port}/x", ssl=ctx) as r:
                    assert r.status == 200
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
            async with s.get(f"http://127.0.0.1:{admin}/healthz") as r:
                assert r.status == 200
        samples = {
            (m.name, tuple(sorted(m.labels.items()))): m.value
            for fam in text_string_to_metric_families(text)
            for m in fam.samples
        }
        assert samples[("podkit_sidecar_tls_tries_total", ())] == 3
        up = (("upstream", f"127.0.0.1:{app_port}"),)
        assert samples[("podkit_sidecar_tls_upstream_available", up)] == 1.0
    finally:
        proc.terminate()
        proc.wait(10)
        await runner.cleanup()
