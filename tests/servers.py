"""Real Redis, NATS and etcd servers on free loopback ports, for tests.

Each server runs as a foreground subprocess in its own temp directory; its output goes to
``log_path``. ``restart()`` keeps the port and the data directory.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import pytest

HOST = "127.0.0.1"
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_handed_out: set[int] = set()
_live: weakref.WeakSet[Server] = weakref.WeakSet()


class ServerError(RuntimeError):
    """A server did not start, or exited early."""


def find_free_port() -> int:
    """A free TCP port on loopback, not handed out before by this process."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def require_binary(name: str, debian_pkg: str) -> str:
    """Path of ``name``; skip the test if missing, or fail it when CI=true or
    PODKIT_REQUIRE_SERVERS=1 (`make test`, which installs the servers first)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path:
        return path
    msg = f"{name} not installed: apt-get install {debian_pkg}"
    strict = os.environ.get("CI", "").lower() == "true"
    if strict or os.environ.get("PODKIT_REQUIRE_SERVERS") == "1":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


class Server:
    """Base class: a subprocess with a port, a data dir and a log file."""

    name = ""
    debian_pkg = ""
    scheme = ""
    stop_signal = signal.SIGTERM

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        self.binary = require_binary(self.name, self.debian_pkg)
        self.extra_args = list(extra_args)
        self.host = HOST
        self.port = find_free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"podkit-test-{self.name}-"))
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} pid={self.pid} dir={self.dir}>"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """One readiness probe; may raise OSError."""
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers."""
        if self.running:
            raise ServerError(f"{self!r} already running")
        cmd = self.command()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"--- {time.strftime('%H:%M:%S')} start: {shlex.join(cmd)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            cmd, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        _live.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ServerError(f"{self.name} exited with {code}\n{self.log_tail()}")
            try:
                if self.ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.name} not ready on {self.url} after {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (`stop_signal`), wait, then SIGKILL if it is still alive."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop, then start again on the same port with the same data dir."""
        self.stop()
        self.start(timeout)

    def remove(self) -> None:
        """Stop and delete the temp directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- tail of {self.log_path}\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class RedisServer(Server):
    name = "redis-server"
    debian_pkg = "redis-server"
    scheme = "redis"

    def __init__(self, appendonly: bool = False, extra_args: Sequence[str] = ()) -> None:
        super().__init__(extra_args)
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", self.host, "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            *self.extra_args,
        ]  # fmt: skip

    def ready(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")


class NatsServer(Server):
    """nats-server with JetStream file storage under ``dir/jetstream``."""

    name = "nats-server"
    debian_pkg = "nats-server"
    scheme = "nats"

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        super().__init__(extra_args)
        self.monitor_port = find_free_port()
        self.store_dir = self.dir / "jetstream"  # nats-server appends "jetstream" to -sd

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    def command(self) -> list[str]:
        return [
            self.binary, "-a", self.host, "-p", str(self.port), "-m", str(self.monitor_port),
            "-js", "-sd", str(self.dir), *self.extra_args,
        ]  # fmt: skip

    def ready(self) -> bool:
        if _get_json(f"{self.monitor_url}/healthz").get("status") != "ok":
            return False
        with socket.create_connection((self.host, self.port), timeout=1) as s:
            return s.recv(4096).startswith(b"INFO ")


class EtcdServer(Server):
    """Single-member etcd; ``http_url`` is its v3 JSON gateway."""

    name = "etcd"
    debian_pkg = "etcd-server"
    scheme = "etcd"

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        super().__init__(extra_args)
        self.peer_port = find_free_port()

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        client, peer = self.http_url, f"http://{self.host}:{self.peer_port}"
        return [
            self.binary, "--name", "n1", "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"n1={peer}", *self.extra_args,
        ]  # fmt: skip

    def ready(self) -> bool:
        return _get_json(f"{self.http_url}/health").get("health") == "true"


class PostgresServer(Server):
    """A private PostgreSQL cluster (initdb in ``dir``); run as the postgres user when root,
    since postgres refuses to run as root. ``url`` connects as that user to ``postgres``."""

    name = "postgres"
    debian_pkg = "postgresql"
    scheme = "postgresql"
    stop_signal = signal.SIGINT  # fast shutdown: SIGTERM would wait for clients to leave

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        super().__init__(extra_args)
        self.data = self.dir / "data"
        self.user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
        initdb = shutil.which("initdb", path=f"{Path(self.binary).parent}:/usr/bin")
        if initdb is None:
            raise ServerError(f"no initdb beside {self.binary}")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        init = subprocess.run(
            [*self._as_owner(), initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust",
             "--no-sync"],
            capture_output=True, text=True,
        )  # fmt: skip
        if init.returncode != 0:
            raise ServerError(f"initdb failed: {init.stderr[-2000:]}")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def _as_owner(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"]

    def command(self) -> list[str]:
        return [
            *self._as_owner(), self.binary, "-D", str(self.data), "-p", str(self.port),
            "-h", self.host, "-k", str(self.dir), "-c", "fsync=off",
            "-c", "full_page_writes=off", *self.extra_args,
        ]  # fmt: skip

    def ready(self) -> bool:
        probe = subprocess.run(
            ["pg_isready", "-q", "-h", self.host, "-p", str(self.port)], capture_output=True
        )
        return probe.returncode == 0


def _get_json(url: str) -> dict[str, Any]:
    try:
        with _no_proxy.open(url, timeout=1) as resp:
            data: dict[str, Any] = json.load(resp)
            return data
    except (OSError, ValueError):
        return {}


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live):
        server.kill()
