"""A small forward proxy for tests, and a TLS origin to reach through it.

`ForwardProxy` listens on a free loopback port. A request whose target is an absolute
`http://` URL is sent on to that origin (one request per connection, with `Connection:
close`) and the answer relayed back; `CONNECT host:port` opens a tunnel and relays both
ways. `log` holds the request line of each request it took (`GET http://...`,
`CONNECT 127.0.0.1:8443`), `authorizations` each `Proxy-Authorization` value it got.
Set `connect_answer` to make it answer CONNECT with those bytes, then close, instead of
opening the tunnel (b"" closes without answering).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from podkit.net.tls import self_signed
from support import TinyHTTP


class ForwardProxy:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.authorizations: list[str] = []
        self.connect_answer: bytes | None = None
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            method, target, _ = line.split(" ")
            self.log.append(f"{method} {target}")
            headers = [f.split(":", 1) for f in fields if f]
            self.authorizations += [
                v.strip() for k, v in headers if k.lower() == "proxy-authorization"
            ]
            if method == "CONNECT":
                await self._tunnel(target, reader, writer)
            else:
                await self._forward(method, target, headers, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _tunnel(
        self, authority: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.connect_answer is not None:
            writer.write(self.connect_answer)
            await writer.drain()
            return
        host, port = authority.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()

    async def _forward(
        self,
        method: str,
        url: str,
        headers: list[list[str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.hostname and parts.port, f"not absolute: {url}"
        length = sum(int(v) for k, v in headers if k.lower() == "content-length")
        body = await reader.readexactly(length)
        skip = {"proxy-authorization", "proxy-connection", "connection"}
        kept = "".join(f"{k}:{v}\r\n" for k, v in headers if k.lower() not in skip)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            up_writer.write(
                f"{method} {target} HTTP/1.1\r\n{kept}Connection: close\r\n\r\n".encode("latin-1")
                + body
            )
            await _pipe(up_reader, writer)  # the answer, until the origin closes
        finally:
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


def tls_origin(
    answer: Callable[[str], tuple[int, bytes]], directory: Path
) -> tuple[TinyHTTP, str, Path]:
    """A TinyHTTP origin speaking TLS with a self-signed certificate for 127.0.0.1: the
    server (`close()` it), its `https://` base URL, and the certificate to trust (as
    SSL_CERT_FILE)."""
    cert, key = self_signed(directory, ("127.0.0.1",))
    origin = TinyHTTP(answer)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    origin.server.socket = context.wrap_socket(origin.server.socket, server_side=True)
    return origin, origin.url.replace("http://", "https://"), cert
