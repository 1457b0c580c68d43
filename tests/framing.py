"""HTTP framing through a proxy, judged by h11: a backend that records every request it
parses (h11, strict) and answers as the request's target says, the proxies under test
(`podkit lb`, `podkit sidecar tls`, `podkit ambassador split`, and nginx beside them), and
a client that sends raw bytes and reads the answers with h11.

A target's query picks the backend's answer (`/r1?a=poison`): see `ANSWERS`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11

from servers import find_free_port, require_binary

# How the backend answers, by the `a` query parameter (default "cl"). Each valid answer
# names the request it answers (X-Answer-To, and the body).
ANSWERS = {
    "cl": "200 with a Content-Length body",
    "chunked": "200 with a chunked body and a trailer",
    "close": "200 with a body that runs until the backend closes",
    "early": "200 sent right after the head, before the request body is read",
    "nobody": "204 No Content",
    "conncl": "200 whose Connection header names Content-Length",
    "poison": "200, then a second whole answer in the same write (surplus)",
    "leak": "200, then the start of an answer carrying a secret header (surplus)",
    "crlf": "200, then an empty line",
    "nul": "200 with a NUL in a header value (invalid)",
    "clte": "200 with both Content-Length and Transfer-Encoding (invalid)",
}
INVALID_ANSWERS = {"nul", "clte"}  # the proxy must answer 502
SECRET = b"secret-of-client-A"
POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nPOISON!"
LEAK = b"HTTP/1.1 200 OK\r\nX-Leak: " + SECRET + b"\r\nX-Pad: "


@dataclass
class Parsed:
    """One request as the backend parsed it."""

    conn: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False

    @property
    def key(self) -> tuple[bytes, bytes, bytes]:
        return self.method, self.target, self.body

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


def answer_mode(target: bytes) -> str:
    return parse_qs(urlsplit(target.decode("latin-1")).query).get("a", ["cl"])[0]


def answer_body(target: bytes) -> bytes:
    return b"answer to " + target


class RecordingBackend:
    """A threaded HTTP/1.1 server on a free loopback port that parses with h11 and records
    what it parsed, in order, across all its connections."""

    def __init__(self) -> None:
        self.port = find_free_port()
        self.parsed: list[Parsed] = []
        self.errors: list[str] = []  # h11 refused what it was sent
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def clear(self) -> None:
        with self._lock:
            self.parsed.clear()
            self.errors.clear()

    def settle(self, timeout: float = 2.0) -> None:
        """Wait until every request parsed so far has been read to its end."""
        deadline = time.monotonic() + timeout
        while any(not p.complete for p in self.parsed) and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        self._stop = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                cid = self.connections
            threading.Thread(target=self._serve, args=(sock, cid), daemon=True).start()

    def _serve(self, sock: socket.socket, cid: int) -> None:
        conn = h11.Connection(h11.SERVER)
        current: Parsed | None = None
        answered = False
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = sock.recv(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is h11.IDLE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    current = Parsed(cid, event.method, event.target, list(event.headers))
                    with self._lock:
                        self.parsed.append(current)
                    answered = False
                    if answer_mode(event.target) == "early":
                        self._answer(conn, sock, current)
                        answered = True
                elif isinstance(event, h11.Data):
                    assert current is not None
                    current.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert current is not None
                    current.complete = True
                    if not answered:
                        self._answer(conn, sock, current)
                    if conn.our_state is not h11.DONE or answer_mode(current.target) == "close":
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            with self._lock:
                self.errors.append(f"connection {cid}: {exc}")
        except OSError:
            pass
        finally:
            if current is not None:
                current.complete = True
            sock.close()

    @staticmethod
    def _answer(conn: h11.Connection, sock: socket.socket, req: Parsed) -> None:
        """Write the answer `req`'s target asks for; h11 is told of a plain answer of the
        same shape so that its state stays in step (its bytes are not sent)."""
        mode = answer_mode(req.target)
        body = answer_body(req.target)
        head_only = req.method == b"HEAD"
        to = b"X-Answer-To: " + req.target + b"\r\n"
        cl = b"Content-Length: %d\r\n" % len(body)
        payload = b"" if head_only else body
        if mode == "nobody":
            raw = b"HTTP/1.1 204 No Content\r\n" + to + b"\r\n"
            body = payload = b""
        elif mode == "chunked" and not head_only:
            raw = (b"HTTP/1.1 200 OK\r\n" + to + b"Transfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n%b\r\n0\r\nX-Sum: 1\r\n\r\n" % (len(body), body))  # fmt: skip
        elif mode == "close":
            raw = b"HTTP/1.1 200 OK\r\n" + to + b"Connection: close\r\n\r\n" + payload
        elif mode == "conncl":
            raw = b"HTTP/1.1 200 OK\r\n" + to + b"Connection: Content-Length\r\n" + cl
            raw += b"\r\n" + payload
        elif mode == "nul":
            raw = b"HTTP/1.1 200 OK\r\n" + to + b"X-Bad: a\x00b\r\n" + cl + b"\r\n" + payload
        elif mode == "clte":
            raw = b"HTTP/1.1 200 OK\r\n" + to + cl + b"Transfer-Encoding: chunked\r\n\r\n"
            raw += b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        else:
            raw = b"HTTP/1.1 200 OK\r\n" + to + cl + b"\r\n" + payload
            raw += {"poison": POISON, "leak": LEAK, "crlf": b"\r\n"}.get(mode, b"")
        status = 204 if mode == "nobody" else 200
        headers = [("Content-Length", str(len(body)))] if status == 200 else []
        if mode == "close":
            headers = [("Connection", "close")]
        conn.send(h11.Response(status_code=status, headers=headers))
        if payload:
            conn.send(h11.Data(data=payload))
        conn.send(h11.EndOfMessage())
        sock.sendall(raw)


# --- the client side -------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class Reply:
    """What a client read: the answers, in order, and what followed them."""

    answers: list[Answer] = field(default_factory=list)
    rest: bytes = b""  # bytes that are no answer (or the start of one never finished)
    closed: bool = False
    error: str = ""  # h11 refused an answer


def read_answers(raw: bytes, methods: list[bytes], closed: bool) -> Reply:
    """Parse `raw` (what a client received) with h11 as the answers to requests of
    `methods`, in order."""
    reply = Reply(closed=closed)
    data = raw
    for method in methods:
        if not data:
            break
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(data)
        if closed:
            conn.receive_data(b"")
        status, headers, body = 0, [], b""
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Response):
                    status, headers = event.status_code, list(event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    reply.rest = data
                    return reply
        except h11.RemoteProtocolError as exc:
            reply.error = str(exc)
            reply.rest = data
            return reply
        reply.answers.append(Answer(status, headers, body))
        data, _ = conn.trailing_data
    reply.rest = data
    return reply


# --- the proxies ------------------------------------------------------------------------

NGINX_CONF = """
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""

PROXIES = ("lb", "sidecar-tls", "split", "nginx")


class Proxy:
    """One proxy in front of a backend, as a process on a free loopback port."""

    def __init__(self, kind: str, backend: int) -> None:
        self.kind = kind
        self.port = find_free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"podkit-framing-{kind}-"))
        self.tls: ssl.SSLContext | None = None
        podkit = [sys.executable, "-m", "podkit"]
        listen = f"127.0.0.1:{self.port}"
        upstream = f"http://127.0.0.1:{backend}"
        self.admin_port = 0
        if kind == "lb":
            self.admin_port = find_free_port()
            cmd = [*podkit, "lb", "--listen", listen, "--upstream", upstream,
                   "--admin-port", str(self.admin_port)]  # fmt: skip
        elif kind == "sidecar-tls":
            cmd = [*podkit, "sidecar", "tls", "--listen", listen, "--upstream", upstream,
                   "--self-signed"]  # fmt: skip
            self.tls = ssl.create_default_context()
            self.tls.check_hostname = False
            self.tls.verify_mode = ssl.CERT_NONE
        elif kind == "split":
            cmd = [*podkit, "ambassador", "split", "--listen", listen, "--arm",
                   f"stable={upstream}"]  # fmt: skip
        elif kind == "nginx":
            binary = require_binary("nginx", "nginx")
            conf = self.dir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(d=self.dir, port=self.port, backend=backend))
            cmd = [binary, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log"),
                   "-g", "daemon off;"]  # fmt: skip
        else:
            raise ValueError(kind)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = open(self.dir / "out.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} is not listening: {self.output()}") from None
                time.sleep(0.05)

    def metric(self, name: str) -> float:
        """A sample of the proxy's admin /metrics (podkit lb only)."""
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(f"{name} not in {url}")

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "out.log").read_text(errors="replace")

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock)
        return sock

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def exchange(
    proxy: Proxy,
    pieces: list[bytes],
    methods: list[bytes],
    *,
    half_close: bool = False,
    timeout: float = 5.0,
) -> Reply:
    """Send `pieces` on one new connection (one write each), read until the answers to
    `methods` are in and nothing more comes (or the proxy closes), and parse them."""
    sock = proxy.connect(timeout)
    received = b""
    closed = False
    try:
        try:
            for piece in pieces:
                sock.sendall(piece)
            if half_close and proxy.tls is None:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy closed early (after a 400): read what it answered
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            have = read_answers(received, methods, False)
            quiet = 0.3 if len(have.answers) >= len(methods) else deadline - time.monotonic()
            sock.settimeout(max(0.01, quiet))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except (ConnectionResetError, ssl.SSLError):
                closed = True
                break
            if not data:
                closed = True
                break
            received += data
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    return read_answers(received, methods, closed)


@contextlib.contextmanager
def started(kind: str, backend: RecordingBackend) -> Iterator[Proxy]:
    proxy = Proxy(kind, backend.port)
    try:
        yield proxy
    finally:
        proxy.stop()
