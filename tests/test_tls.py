"""podkit.net.tls: TLS 1.2+ with modern ciphers only, certificates reloaded from their
files for new connections, broken files keep the last good certificate."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from pathlib import Path

import pytest

from podkit.net.tls import ReloadingContext, pair_problem, self_signed


async def serve(ctx: ssl.SSLContext) -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


def client(cafile: Path, **kw: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


async def talk(port: int, ctx: ssl.SSLContext) -> tuple[bytes, bytes, str]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(b"hello")
    answer = await reader.read(100)
    sslobj = writer.get_extra_info("ssl_object")
    cert = sslobj.getpeercert(binary_form=True)
    version = sslobj.version()
    writer.close()
    return answer, cert, version


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls12_and_13_with_modern_ciphers_only(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, ["localhost", "127.0.0.1"])
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    server, port = await serve(ReloadingContext(cert, key).context)
    async with server:
        answer, _, version = await talk(port, client(cert))
        assert (answer, version) == (b"HELLO", "TLSv1.3")
        tls12 = client(cert, maximum_version=ssl.TLSVersion.TLSv1_2)
        assert (await talk(port, tls12))[2] == "TLSv1.2"
        old = client(
            cert, minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1_1
        )
        old.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await talk(port, old)
        cbc = client(cert, maximum_version=ssl.TLSVersion.TLSv1_2)
        cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA")  # CBC with SHA-1: refused
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await talk(port, cbc)


async def test_a_renewed_certificate_serves_new_connections(tmp_path: Path) -> None:
    live = tmp_path / "live"
    cert, key = self_signed(tmp_path / "a", ["localhost"])
    live.mkdir()
    shutil.copy(cert, live / "cert.pem")
    shutil.copy(key, live / "key.pem")
    messages: list[str] = []
    reloading = ReloadingContext(live / "cert.pem", live / "key.pem", log=messages.append)
    server, port = await serve(reloading.context)
    new_cert, new_key = self_signed(tmp_path / "b", ["localhost"])
    async with server:
        _, first, _ = await talk(port, client(cert))
        assert not reloading.check()  # nothing changed
        # a broken pair (half-written key) keeps the last good certificate
        (live / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\ntruncated")
        assert not reloading.check() and reloading.last_error
        assert (await talk(port, client(cert)))[1] == first
        # the renewal lands: both files replaced by rename, as certbot and cert-manager do
        for src, name in ((new_cert, "cert.pem"), (new_key, "key.pem")):
            shutil.copy(src, live / f".{name}")
            os.replace(live / f".{name}", live / name)
        assert reloading.check() and reloading.loads == 2
        _, second, _ = await talk(port, client(new_cert))
        assert second != first
        with pytest.raises(ssl.SSLCertVerificationError):  # the old one is gone
            await talk(port, client(cert))
    assert any("keeping the last good one" in m for m in messages)


def test_server_objects_use_the_c_methods_and_still_speak_tls(tmp_path: Path) -> None:
    """The event loop's per-record calls skip ssl.SSLObject's Python wrappers, and a
    handshake plus data both ways through memory BIOs works as with the stock object."""
    from podkit.net.tls import server_context

    cert, key = self_signed(tmp_path)
    server_ctx = server_context(cert, key)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    assert type(server.read).__name__ == "builtin_function_or_method"
    assert type(server.write).__name__ == "builtin_function_or_method"
    assert type(server.pending).__name__ == "builtin_function_or_method"
    client_obj = client(cert).wrap_bio(c_in, c_out, server_hostname="localhost")

    def pump() -> None:
        s_in.write(c_out.read())
        c_in.write(s_out.read())

    for _ in range(10):
        for side in (client_obj, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        pump()
    assert server.version() in ("TLSv1.2", "TLSv1.3")
    client_obj.write(b"GET / HTTP/1.1\r\n\r\n")
    pump()
    assert server.pending() == 0  # nothing decrypted yet: the record waits in the BIO
    assert server.read(1024) == b"GET / HTTP/1.1\r\n\r\n"
    with pytest.raises(ssl.SSLWantReadError):
        server.read(1024)
    assert server.write(b"HTTP/1.1 200 OK\r\n\r\n") == 19
    pump()
    assert client_obj.read(1024) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_a_pair_that_does_not_load_is_said_plainly(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "a", ["localhost"])
    _, other_key = self_signed(tmp_path / "b", ["localhost"])
    text = tmp_path / "hostname"
    text.write_text("web-1\n")
    assert pair_problem(cert, key) is None
    assert (
        pair_problem(tmp_path / "nope.pem", key)
        == f"{tmp_path / 'nope.pem'}: No such file or directory"
    )
    assert (
        pair_problem(text, text)
        == f"{text} holds no PEM certificate (no '-----BEGIN CERTIFICATE-----')"
    )
    assert pair_problem(cert, text) == f"{text} holds no PEM private key (no 'PRIVATE KEY-----')"
    assert (
        pair_problem(cert, other_key) == f"the key in {other_key} is not the certificate's ({cert})"
    )


def test_a_missing_key_file_is_named_not_the_certificate(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, ["localhost"])
    missing = tmp_path / "nokey.pem"
    assert pair_problem(cert, missing) == f"{missing}: No such file or directory"
