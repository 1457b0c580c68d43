"""podkit.net.tlsconn: the TLS layer of podkit's servers, between the socket and the app.

In process (records cut at any byte, both ways) and over real sockets with Python's ssl
client: bad or missing handshakes, close_notify both ways, flow control of a large answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podkit.net.tls import self_signed, server_context
from podkit.net.tlsconn import TLSConnection


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), ["localhost"])


class App(asyncio.Protocol):
    """Records what the TLS layer hands it; `on_data` may answer."""

    def __init__(self, on_data: Any = None) -> None:
        self.transport: Any = None
        self.received = bytearray()
        self.made = 0
        self.eofs = 0
        self.lost: list[Exception | None] = []
        self.pauses = 0
        self.resumed = asyncio.Event()
        self.on_data = on_data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made += 1
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.on_data is not None:
            self.on_data(self, data)

    def eof_received(self) -> bool:
        self.eofs += 1
        return True  # keep it open: the test decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.pauses += 1
        self.resumed.clear()

    def resume_writing(self) -> None:
        self.resumed.set()


class Wire(asyncio.Transport):
    """The socket's transport, in process: what the TLS layer writes is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.eof = False  # the FIN was sent

    def write(self, data: Any) -> None:
        assert not self.eof, "a write after the FIN"
        self.out += data

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` in pieces of the given sizes (cycled), the last one what remains."""
    pieces, at, i = [], 0, 0
    while at < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        pieces.append(data[at : at + n])
        at += n
        i += 1
    return pieces


class Peer:
    """A TLS client over memory BIOs, talking to a TLSConnection through a Wire."""

    def __init__(self, cert: Path, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> None:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.maximum_version = version
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.closed = False  # the server's close_notify arrived

    def handshake(self, conn: TLSConnection, wire: Wire, sizes: list[int]) -> None:
        for _ in range(10):
            try:
                self.obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            for piece in cut(self.outgoing.read(), sizes):
                conn.data_received(piece)
            self.incoming.write(wire.take())
            if done:
                return
        raise AssertionError("no handshake")

    def close_notify(self) -> bytes:
        """The client's close_notify record (it then waits for the server's)."""
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def seal(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()

    def open(self, raw: bytes) -> bytes:
        self.incoming.write(raw)
        out = bytearray()
        while True:
            try:
                chunk = self.obj.read(1 << 20)
            except ssl.SSLWantReadError:
                return bytes(out)
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                self.closed = True
                return bytes(out)
            out += chunk


def connected(
    cert: Path,
    key: Path,
    app: App,
    version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    sizes: list[int] | None = None,
) -> tuple[TLSConnection, Wire, Peer]:
    """A TLSConnection for `app` on a Wire, its handshake with a Peer done (the handshake
    bytes cut into `sizes`). Call inside a running loop (the handshake timer)."""
    conn = TLSConnection(server_context(cert, key), app)
    wire = Wire()
    conn.connection_made(wire)
    peer = Peer(cert, version)
    peer.handshake(conn, wire, sizes or [])
    return conn, wire, peer


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    messages=st.lists(st.binary(min_size=1, max_size=40_000), min_size=1, max_size=4),
    sizes=st.lists(st.integers(1, 3000), max_size=6),
    version=st.sampled_from([ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]),
)
def test_records_cut_at_any_byte_reach_the_app_whole_and_answers_reach_the_client(
    pair: tuple[Path, Path], messages: list[bytes], sizes: list[int], version: ssl.TLSVersion
) -> None:
    cert, key = pair

    async def go() -> None:
        app = App(on_data=lambda a, d: a.transport.write(d))  # an echo
        conn, wire, peer = connected(cert, key, app, version, sizes)
        assert app.made == 1
        assert app.transport.get_extra_info("peername") == ("127.0.0.1", 40000)
        assert app.transport.get_extra_info("ssl_object").version() == version.name.replace(
            "v1_", "v1."
        )
        sent = b"".join(peer.seal(m) for m in messages)
        for piece in cut(sent, sizes):
            conn.data_received(piece)
        whole = b"".join(messages)
        assert bytes(app.received) == whole
        assert peer.open(wire.take()) == whole
        # the client's close_notify is the app's end of input, told once
        for piece in cut(peer.close_notify(), sizes):
            conn.data_received(piece)
        assert app.eofs == 1
        conn.eof_received()  # then the FIN
        assert app.eofs == 1
        assert not wire.closed  # the app said to keep it open
        app.transport.close()
        assert wire.closed
        assert peer.open(wire.take()) == b""
        assert peer.closed  # our close_notify
        conn.connection_lost(None)
        assert app.lost == [None]

    asyncio.run(go())


def test_a_broken_record_aborts_and_the_app_is_told(pair: tuple[Path, Path]) -> None:
    cert, key = pair

    async def go() -> None:
        app = App()
        conn, wire, peer = connected(cert, key, app)
        record = bytearray(peer.seal(b"GET / HTTP/1.1\r\n\r\n"))
        record[-1] ^= 1  # the tag no longer matches
        conn.data_received(bytes(record))
        assert wire.aborted
        assert app.received == b""
        conn.connection_lost(None)
        assert app.lost == [None]

    asyncio.run(go())


async def serve(
    cert: Path, key: Path, apps: list[App], handshake_timeout: float = 10.0, **app_kw: Any
) -> tuple[asyncio.Server, int]:
    ctx = server_context(cert, key)

    def factory() -> TLSConnection:
        app = App(**app_kw)
        apps.append(app)
        return TLSConnection(ctx, app, handshake_timeout=handshake_timeout)

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def blocking_client(cert: Path, port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(cert))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)


async def test_garbage_or_silence_instead_of_a_handshake_is_dropped_and_others_served(
    pair: tuple[Path, Path],
) -> None:
    cert, key = pair
    apps: list[App] = []
    server, port = await serve(cert, key, apps, handshake_timeout=0.3,
                               on_data=lambda a, d: a.transport.write(d.upper()))  # fmt: skip

    def garbage(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(data)
            try:
                return s.recv(1000)
            except ConnectionResetError:
                return b""

    def too_old() -> str:
        with pytest.warns(DeprecationWarning):
            ctx = ssl.create_default_context(cafile=str(cert))
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                ctx.wrap_socket(s, server_hostname="localhost")
            except ssl.SSLError as exc:
                return str(exc)
        raise AssertionError("a TLS 1.1 handshake was accepted")

    def silent() -> float:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                assert s.recv(1000) == b""
            except ConnectionResetError:
                pass
        return time.monotonic() - start

    def good() -> bytes:
        with blocking_client(cert, port) as s:
            s.sendall(b"hello")
            return s.recv(100)

    async with server:
        answer = await asyncio.to_thread(garbage, b"\x00\x01 no TLS\r\n\r\n")
        assert answer == b"" or answer[:1] == b"\x15"  # the end, or an alert record first
        answer = await asyncio.to_thread(garbage, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(
            b"This port speaks HTTPS: a plain HTTP request was sent to it.\n"
        )
        assert "alert protocol version" in await asyncio.to_thread(too_old)
        waited = await asyncio.to_thread(silent)
        assert 0.25 < waited < 3
        assert await asyncio.to_thread(good) == b"HELLO"
        assert [a.made for a in apps] == [0, 0, 0, 0, 1]


async def test_write_eof_sends_close_notify_and_the_answer_is_not_cut(
    pair: tuple[Path, Path],
) -> None:
    cert, key = pair
    apps: list[App] = []
    body = b"x" * 300_000

    def answer_and_end(app: App, data: bytes) -> None:
        if b"\n" in app.received:
            app.transport.write(body)
            app.transport.write_eof()

    server, port = await serve(cert, key, apps, on_data=answer_and_end)

    def client() -> bytes:
        with blocking_client(cert, port) as s:
            s.sendall(b"request\n")
            got = bytearray()
            while True:
                chunk = s.recv(65536)  # SSLEOFError if the end came without close_notify
                if not chunk:
                    break
                got += chunk
            try:
                s.sendall(b"more after the end")  # still read: the app decides
            except OSError:
                pass
            return bytes(got)

    async with server:
        got = await asyncio.to_thread(client)
        assert got == body
        app = apps[0]
        assert app.transport.can_write_eof()
        app.transport.close()
        await asyncio.sleep(0.1)
        assert app.received in (b"request\n", b"request\nmore after the end")
        assert len(app.lost) == 1


async def test_a_large_answer_pauses_the_app_until_the_client_reads(
    pair: tuple[Path, Path],
) -> None:
    cert, key = pair
    apps: list[App] = []
    total = 16 * 1024 * 1024
    piece = bytes(range(256)) * 256  # 64 KiB
    sent = asyncio.Event()

    async def produce(app: App) -> None:
        app.resumed.set()
        for _ in range(total // len(piece)):
            await app.resumed.wait()
            app.transport.write(piece)
        sent.set()

    def start(app: App, data: bytes) -> None:
        asyncio.get_running_loop().create_task(produce(app))

    server, port = await serve(cert, key, apps, on_data=start)
    reading = threading.Event()

    def client() -> str:
        with blocking_client(cert, port) as s:
            s.sendall(b"go")
            reading.wait(10)
            digest, n = hashlib.sha256(), 0
            while n < total:
                chunk = s.recv(1 << 20)
                assert chunk
                digest.update(chunk)
                n += len(chunk)
            return digest.hexdigest()

    async with server:
        task = asyncio.ensure_future(asyncio.to_thread(client))
        await asyncio.sleep(0.5)  # the client does not read yet
        assert apps and apps[0].pauses >= 1
        assert not sent.is_set()
        reading.set()
        digest = await asyncio.wait_for(task, 30)
        assert sent.is_set()
        expect = hashlib.sha256()
        for _ in range(total // len(piece)):
            expect.update(piece)
        assert digest == expect.hexdigest()


def test_bytes_after_the_clients_close_notify_are_dropped_not_kept(
    pair: tuple[Path, Path],
) -> None:
    """The app keeps the connection open to answer (a request in flight, a tunnel): what
    the client still sends after its close_notify cannot be read and must not pile up."""
    cert, key = pair

    async def go() -> None:
        app = App()
        conn, wire, peer = connected(cert, key, app)
        conn.data_received(peer.close_notify())
        assert app.eofs == 1
        for _ in range(100):
            conn.data_received(b"\x17\x03\x03\x40\x00" + b"x" * 16384)
        assert conn.incoming.pending < 20_000
        assert app.eofs == 1
        app.transport.write(b"the answer")
        assert peer.open(wire.take()) == b"the answer"

    asyncio.run(go())


def test_after_write_eof_the_clients_side_still_reaches_the_app(pair: tuple[Path, Path]) -> None:
    """A tunnel whose upstream ended its side: the proxy passes that on with write_eof,
    and what the client still sends, then its close_notify, must reach the app."""
    cert, key = pair

    async def go() -> None:
        app = App()
        conn, wire, peer = connected(cert, key, app)
        app.transport.write(b"last words")
        app.transport.write_eof()
        assert wire.eof
        assert peer.open(wire.take()) == b"last words"
        assert peer.closed
        conn.data_received(peer.seal(b"the client goes on"))
        assert app.received == b"the client goes on"
        conn.data_received(peer.close_notify())
        assert app.eofs == 1
        assert not wire.closed  # the app said to keep it open
        conn.eof_received()  # the FIN
        assert app.eofs == 1
        app.transport.close()
        assert wire.closed and not wire.aborted

    asyncio.run(go())
