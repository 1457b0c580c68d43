"""Helpers for runtime tests: ports, subnets, specs on disk, HTTP and waiting."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

APPS = Path(__file__).parent / "apps"
_subnets = itertools.count(os.getpid() % 200)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive loopback ports free now (a balancer's workers
    take admin_port + i)."""
    for _ in range(100):
        first = free_port(host)
        if first + count > 65535:
            continue
        socks = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


@contextlib.contextmanager
def port_in_use(host: str = "127.0.0.1") -> Iterator[int]:
    """A loopback port some other socket listens on, for as long as the block runs."""
    with socket.socket() as s:
        s.bind((host, 0))
        s.listen()
        yield int(s.getsockname()[1])


def podkit_error(argv: list[str]) -> tuple[int, str]:
    """Run podkit with `argv` until it stops; its exit code and last line of stderr (and
    check that stderr holds no traceback)."""
    run = subprocess.run([sys.executable, "-m", "podkit", *argv], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert "Traceback" not in run.stderr, run.stderr
    return run.returncode, run.stderr.splitlines()[-1]


def unique_subnet() -> str:
    """A /16 in 127.0.0.0/8 no other test of this run uses."""
    return f"127.{20 + next(_subnets) % 230}.0.0/16"


def podkit_up(spec: Path, log: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    """`podkit up SPEC` on a subnet of its own, its output in `log`, its state in `run_dir`."""
    return subprocess.Popen(
        [sys.executable, "-m", "podkit", "up", str(spec), "--subnet", unique_subnet()],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PODKIT_RUN_DIR=str(run_dir)),
    )


class TinyHTTP:
    """A threaded HTTP/1.1 server on a free loopback port for tests: `answer(path)` gives
    the (status, body) of every GET. `url` is its base; `close()` stops it."""

    def __init__(self, answer: Callable[[str], tuple[int, bytes]]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # head and body go in two writes

            def do_GET(self) -> None:
                status, body = answer(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def aget(url: str, timeout: float = 2.0) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, url, timeout)


async def wait_for(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> float:
    """Poll `check` until true; return the seconds it took; fail after `timeout`."""
    start = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): read its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
