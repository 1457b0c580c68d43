"""`podkit sidecar config`: sources, atomic swaps, validation, outages and notifications.

Latencies (source change -> file content) are measured and asserted below 1 s; they are
printed with `-s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from forward_proxy import ForwardProxy, tls_origin
from podkit.aio import stop_task
from podkit.backends import open_kv
from podkit.sidecar.config import (
    Backoff,
    CommandNotifier,
    ConfigSync,
    FileSource,
    HTTPNotifier,
    HTTPSource,
    KVSource,
    SignalNotifier,
    Snapshot,
    Source,
    digest,
    open_source,
)
from servers import EtcdServer, NatsServer, RedisServer
from support import TinyHTTP, free_port, http_get, podkit_error, port_in_use, wait_for

POLL = 0.1


def quiet(_: str) -> None:
    return None


@contextlib.asynccontextmanager
async def running(sync: ConfigSync) -> AsyncIterator[ConfigSync]:
    task = asyncio.create_task(sync.run())
    try:
        yield sync
    finally:
        await stop_task(task)
        await sync.close()


def reads(path: Path, content: bytes) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return path.read_bytes() == content
        except OSError:
            return False

    return check


async def change_reaches_file(change: Callable[[], object], dest: Path, content: bytes) -> float:
    """Apply `change`, return the seconds until `dest` holds `content` (fails past 1 s)."""
    start = time.monotonic()
    result = change()
    if asyncio.iscoroutine(result):
        await result
    check = reads(dest, content)
    while not check():
        assert time.monotonic() - start < 1.0, f"{content!r} not in {dest} within 1 s"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


# ---------------------------------------------------------------------------- sources


async def test_file_source_change_reaches_file_within_1s(tmp_path: Path) -> None:
    src, dest = tmp_path / "src.conf", tmp_path / "app.conf"
    src.write_bytes(b"v1\n")
    async with running(ConfigSync(FileSource(src, POLL), dest, log=quiet)) as sync:
        await wait_for(reads(dest, b"v1\n"), timeout=2)
        latency = await change_reaches_file(lambda: src.write_bytes(b"v2\n"), dest, b"v2\n")
        await wait_for(lambda: sync.status.writes == 2, timeout=1)  # set just after the rename
        assert sync.status.version == digest(b"v2\n")
    print(f"file source: change -> file in {latency * 1000:.0f} ms")
    assert latency < 1.0


class ConfigServer:
    """A tiny HTTP config server with ETags; counts 200s and 304s; can fail on demand."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.version = 1
        self.status_override: int | None = None
        self.ok = 0
        self.not_modified = 0
        self.reloads: list[tuple[str, str]] = []
        app = web.Application()
        app.router.add_get("/app.conf", self.config)
        app.router.add_route("*", "/-/reload", self.reload)
        self.runner = web.AppRunner(app)
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, content: bytes) -> None:
        self.content = content
        self.version += 1

    async def config(self, request: web.Request) -> web.Response:
        if self.status_override is not None:
            return web.Response(status=self.status_override, text="down for maintenance")
        etag = f'"v{self.version}"'
        if request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        self.ok += 1
        return web.Response(body=self.content, headers={"ETag": etag})

    async def reload(self, request: web.Request) -> web.Response:
        self.reloads.append((request.method, request.headers.get("X-Podkit-Config-Version", "")))
        return web.Response(text="reloaded")

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def config_server() -> AsyncIterator[ConfigServer]:
    server = ConfigServer(b"listen 80;\n")
    await server.start()
    yield server
    await server.stop()


async def test_http_source_etag_and_latency(tmp_path: Path, config_server: ConfigServer) -> None:
    dest = tmp_path / "app.conf"
    source = HTTPSource(f"{config_server.url}/app.conf", POLL)
    async with running(ConfigSync(source, dest, log=quiet)) as sync:
        await wait_for(reads(dest, b"listen 80;\n"), timeout=2)
        await wait_for(lambda: config_server.not_modified >= 3, timeout=2, what="304s")
        assert config_server.ok == 1  # unchanged content is not downloaded again
        assert sync.status.source_up and sync.status.last_error is None  # 304 is no error
        latency = await change_reaches_file(
            lambda: config_server.set(b"listen 81;\n"), dest, b"listen 81;\n"
        )
        await wait_for(lambda: sync.status.writes == 2, timeout=1)  # set just after the rename
        assert sync.status.version == '"v2"'
    print(f"http source: change -> file in {latency * 1000:.0f} ms")
    assert latency < 1.0


async def test_http_source_goes_through_the_proxy_the_environment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    proxy = ForwardProxy()
    await proxy.start()
    origin = TinyHTTP(lambda path: (200, f"plain {path}".encode()))
    secure, secure_url, cert = tls_origin(lambda path: (200, f"tls {path}".encode()), tmp_path)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusts the TLS origin's certificate
    dest = tmp_path / "app.conf"

    async def sync_from(url: str) -> bytes:
        sync = ConfigSync(HTTPSource(url), dest, log=quiet)
        try:
            await sync.sync_once()
        finally:
            await sync.close()
        return dest.read_bytes()

    try:
        assert await sync_from(f"{origin.url}/a.conf") == b"plain /a.conf"
        assert await sync_from(f"{secure_url}/b.conf") == b"tls /b.conf"
        through = [f"GET {origin.url}/a.conf", f"CONNECT {secure_url.removeprefix('https://')}"]
        assert proxy.log == through
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert await sync_from(f"{origin.url}/c.conf") == b"plain /c.conf"
        assert await sync_from(f"{secure_url}/d.conf") == b"tls /d.conf"
        assert proxy.log == through  # reached directly
    finally:
        await proxy.stop()
        origin.close()
        secure.close()


@pytest.fixture(params=["memory", "redis", "etcd", "nats"])
def kv_url(request: pytest.FixtureRequest) -> str:
    if request.param == "nats":
        nats: NatsServer = request.getfixturevalue("nats_server")
        return f"{nats.url}?prefix=sidecar{id(request)}"
    if request.param == "etcd":
        etcd: EtcdServer = request.getfixturevalue("etcd_server")
        return etcd.url
    if request.param == "memory":
        return f"memory://sidecar-{id(request)}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


async def test_kv_source_follows_a_key_written_before_an_etcd_compaction(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    """etcd drops old revisions (compaction): the watch must not start from the key's
    own, long-gone revision, but from the store's at the read."""
    dest, key = tmp_path / "app.conf", f"config/{tmp_path.name}"
    kv = await open_kv(etcd_server.url)
    try:
        await kv.put(key, b"old=1\n")
        for i in range(5):
            await kv.put(f"other/{tmp_path.name}/{i}", b"x")
        now = await kv.revision()
        async with aiohttp.ClientSession() as s:
            body = {"revision": str(now), "physical": True}
            async with s.post(f"{etcd_server.http_url}/v3/kv/compaction", json=body) as resp:
                assert resp.status == 200, await resp.text()
        sync = ConfigSync(KVSource(etcd_server.url, key, POLL), dest, log=quiet)
        async with running(sync):
            await wait_for(reads(dest, b"old=1\n"), timeout=2)
            await asyncio.sleep(0.3)  # the watch is up, and has not failed
            assert sync.status.last_error is None and sync.status.source_up
            await change_reaches_file(lambda: kv.put(key, b"new=2\n"), dest, b"new=2\n")
            assert sync.status.last_error is None
    finally:
        await kv.close()


async def test_kv_source_watch_latency(tmp_path: Path, kv_url: str) -> None:
    dest = tmp_path / "app.conf"
    key = f"config/{tmp_path.name}"
    kv = await open_kv(kv_url)
    try:
        sync = ConfigSync(KVSource(kv_url, key, POLL), dest, log=quiet)
        async with running(sync):
            await asyncio.sleep(0.05)
            assert not dest.exists()  # no key yet: nothing written
            first = await change_reaches_file(lambda: kv.put(key, b"a=1\n"), dest, b"a=1\n")
            latencies = [first]
            for i in range(2, 5):
                value = f"a={i}\n".encode()
                latencies.append(
                    await change_reaches_file(lambda v=value: kv.put(key, v), dest, value)
                )
            rev = await kv.get(key)
            assert rev is not None
            await wait_for(lambda: sync.status.version == f"revision {rev.revision}", timeout=1)
            # a deleted key keeps the last good file, and a new value comes through
            await kv.delete(key)
            await asyncio.sleep(0.1)
            assert dest.read_bytes() == b"a=4\n"
            latencies.append(
                await change_reaches_file(lambda: kv.put(key, b"a=5\n"), dest, b"a=5\n")
            )
    finally:
        await kv.close()
    print(f"kv source {kv_url.split(':')[0]}: change -> file in "
          + ", ".join(f"{x * 1000:.0f}" for x in latencies) + " ms")  # fmt: skip
    assert max(latencies) < 1.0


async def test_kv_source_survives_a_redis_restart(tmp_path: Path, fresh_redis: RedisServer) -> None:
    dest = tmp_path / "app.conf"
    kv = await open_kv(fresh_redis.url)
    await kv.put("cfg", b"before\n")
    sync = ConfigSync(
        KVSource(fresh_redis.url, "cfg", POLL), dest, log=quiet, backoff=Backoff(0.05, 0.2)
    )
    try:
        async with running(sync):
            await wait_for(reads(dest, b"before\n"), timeout=2)
            await asyncio.to_thread(fresh_redis.restart)
            await kv.put("cfg", b"after\n")
            await wait_for(reads(dest, b"after\n"), timeout=5, what="the value after a restart")
    finally:
        await kv.close()


def test_open_source_by_description(tmp_path: Path) -> None:
    assert isinstance(open_source(str(tmp_path / "a")), FileSource)
    assert isinstance(open_source(f"file://{tmp_path}/a"), FileSource)
    assert isinstance(open_source("https://example.com/a"), HTTPSource)
    assert isinstance(open_source("redis://127.0.0.1:1/0", key="k"), KVSource)
    with pytest.raises(ValueError, match="--key"):
        open_source("redis://127.0.0.1:1/0")


# ---------------------------------------------------------------------------- guarantees


class ListSource:
    """Yields the snapshots it is given, as a test drives it."""

    description = "test source"

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Snapshot | Exception] = asyncio.Queue()

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item

    async def close(self) -> None:
        return None


def test_source_protocol() -> None:
    source: Source = ListSource()
    assert source.description


async def test_atomic_replacement_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    big = [bytes([c]) * 2_000_000 for c in b"ab"]
    dest.write_bytes(big[0])
    stop = threading.Event()
    seen: list[int] = []
    bad: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            data = dest.read_bytes()
            seen.append(len(data))
            if data not in big:
                bad.append(len(data))

    sync = ConfigSync(ListSource(), dest, log=quiet)
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 21):
            assert await sync.apply(Snapshot(big[i % 2], str(i)))
    finally:
        stop.set()
        thread.join()
    assert not bad, f"partial reads: {bad[:5]}"
    assert len(seen) > 20
    assert sorted(os.listdir(tmp_path)) == ["app.conf"]  # no temp file left behind


async def test_unchanged_content_is_not_rewritten(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    dest.write_bytes(b"same\n")
    os.chmod(dest, 0o600)
    before = os.stat(dest)
    sync = ConfigSync(ListSource(), dest, log=quiet)
    assert not await sync.apply(Snapshot(b"same\n", "1"))
    assert os.stat(dest).st_ino == before.st_ino
    assert await sync.apply(Snapshot(b"new\n", "2"))
    assert os.stat(dest).st_mode & 0o777 == 0o600  # the file's mode is kept


async def test_validate_rejects_and_keeps_the_old_config(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    script = (
        "import sys; t = open(sys.argv[1]).read(); "
        "sys.exit(0 if t.startswith('ok') else print('bad config: ' + t.strip()) or 3)"
    )
    check = [sys.executable, "-c", script, "{}"]
    messages: list[str] = []
    sync = ConfigSync(ListSource(), dest, validate=check, log=messages.append)
    assert await sync.apply(Snapshot(b"ok 1\n", "v1"))
    assert not await sync.apply(Snapshot(b"broken\n", "v2"))
    assert dest.read_bytes() == b"ok 1\n"
    assert sync.status.version == "v1" and sync.status.rejected == 1
    assert sync.status.last_error is not None
    assert "v2 rejected" in sync.status.last_error and "bad config: broken" in messages[-1]
    assert sorted(os.listdir(tmp_path)) == ["app.conf"]
    assert await sync.apply(Snapshot(b"ok 2\n", "v3"))
    assert dest.read_bytes() == b"ok 2\n" and sync.status.last_error is None


async def test_source_down_keeps_last_good_and_recovers(
    tmp_path: Path, config_server: ConfigServer
) -> None:
    dest = tmp_path / "app.conf"
    source = HTTPSource(f"{config_server.url}/app.conf", POLL)
    sync = ConfigSync(source, dest, log=quiet, backoff=Backoff(0.05, 0.2))
    async with running(sync):
        await wait_for(reads(dest, b"listen 80;\n"), timeout=2)
        config_server.status_override = 503
        await wait_for(lambda: not sync.status.source_up, timeout=2, what="source down")
        assert sync.status.last_error is not None and "HTTP 503" in sync.status.last_error
        await config_server.stop()  # now refused outright
        await asyncio.sleep(0.3)
        assert dest.read_bytes() == b"listen 80;\n"
        assert sync.status.version == '"v1"'
        config_server.status_override = None
        config_server.set(b"listen 82;\n")
        restarted = ConfigServer(b"")
        restarted.port, restarted.content, restarted.version = (
            config_server.port,
            b"listen 82;\n",
            2,
        )
        await restarted.start()
        try:
            await wait_for(reads(dest, b"listen 82;\n"), timeout=2, what="recovery")
            assert sync.status.source_up
        finally:
            await restarted.stop()


async def test_file_source_missing_keeps_file(tmp_path: Path) -> None:
    src, dest = tmp_path / "src.conf", tmp_path / "app.conf"
    src.write_bytes(b"x\n")
    sync = ConfigSync(FileSource(src, POLL), dest, log=quiet, backoff=Backoff(0.05, 0.1))
    async with running(sync):
        await wait_for(reads(dest, b"x\n"), timeout=2)
        src.unlink()
        await wait_for(lambda: not sync.status.source_up, timeout=2)
        assert dest.read_bytes() == b"x\n"
        src.write_bytes(b"y\n")
        await wait_for(reads(dest, b"y\n"), timeout=2)


# ---------------------------------------------------------------------------- notifications


async def test_notifications_signal_url_and_command(
    tmp_path: Path, config_server: ConfigServer
) -> None:
    dest = tmp_path / "app.conf"
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    got_signal = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, got_signal.set)
    marker = tmp_path / "changed.txt"
    notifiers = [
        SignalNotifier(signal.SIGUSR1, pid_file),
        HTTPNotifier(f"{config_server.url}/-/reload", "POST"),
        HTTPNotifier(f"{config_server.url}/-/reload", "GET"),
        CommandNotifier(
            ["sh", "-c", f'echo "$PODKIT_CONFIG_PATH $PODKIT_CONFIG_VERSION" > {marker}']
        ),
    ]
    sync = ConfigSync(ListSource(), dest, notifiers=notifiers, log=quiet)
    try:
        assert await sync.apply(Snapshot(b"v\n", "v9"))
        await asyncio.wait_for(got_signal.wait(), 1)
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert config_server.reloads == [("POST", "v9"), ("GET", "v9")]
    assert marker.read_text() == f"{dest} v9\n"
    assert sync.status.notify_failures == 0


async def test_failed_notification_is_reported(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    notifiers = [
        SignalNotifier(signal.SIGHUP, tmp_path / "missing.pid"),
        CommandNotifier(["sh", "-c", "echo nope; exit 4"]),
    ]
    sync = ConfigSync(ListSource(), dest, notifiers=notifiers, log=quiet)
    assert await sync.apply(Snapshot(b"v\n", "v1"))
    assert dest.read_bytes() == b"v\n"
    assert sync.status.notify_failures == 2
    assert sync.status.last_error is not None and "exited with 4: nope" in sync.status.last_error


# ---------------------------------------------------------------------------- the command


@pytest.fixture
def hup_app(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """An 'app' that appends its config to a log on every SIGHUP."""
    pid_file, seen = tmp_path / "app.pid", tmp_path / "seen.log"
    code = (
        "import signal, sys, time, os\n"
        f"conf, seen = {str(tmp_path / 'app.conf')!r}, {str(seen)!r}\n"
        "def hup(*_):\n"
        "    open(seen, 'a').write(open(conf).read())\n"
        "signal.signal(signal.SIGHUP, hup)\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "while True: time.sleep(1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 5
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield proc, pid_file, seen
    proc.kill()
    proc.wait()


def test_command_line_file_source_signal_and_status(
    tmp_path: Path, hup_app: tuple[subprocess.Popen[bytes], Path, Path]
) -> None:
    _, pid_file, seen = hup_app
    src, dest = tmp_path / "src.conf", tmp_path / "app.conf"
    src.write_text("color=blue\n")
    admin = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "podkit", "sidecar", "config", "--source", str(src),
         "--path", str(dest), "--interval", "0.1", "--signal", "HUP", "--pid-file", str(pid_file),
         "--admin-port", str(admin)],
        stderr=(tmp_path / "sidecar.log").open("wb"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not (seen.exists() and seen.read_text() == "color=blue\n"):
            assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
            assert time.monotonic() < deadline, "the app was not told about the first config"
            time.sleep(0.02)
        start = time.monotonic()
        src.write_text("color=red\n")
        while seen.read_text() != "color=blue\ncolor=red\n":
            assert time.monotonic() - start < 1.0, "the app saw no change within 1 s"
            time.sleep(0.01)
        latency = time.monotonic() - start
        print(f"command line: change -> app reloaded in {latency * 1000:.0f} ms")
        status, body = http_get(f"http://127.0.0.1:{admin}/status")
        data = json.loads(body)
        assert status == 200 and data["writes"] == 2 and data["source_up"]
        assert data["version"] == digest(b"color=red\n") and data["last_error"] is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_command_line_once_and_bad_flags(tmp_path: Path) -> None:
    src, dest = tmp_path / "src.conf", tmp_path / "app.conf"
    src.write_text("k=v\n")
    run = [sys.executable, "-m", "podkit", "sidecar", "config", "--path", str(dest)]
    done = subprocess.run([*run, "--source", str(src), "--once"], capture_output=True)
    assert done.returncode == 0 and dest.read_text() == "k=v\n"
    bad = subprocess.run([*run, "--source", "redis://127.0.0.1:1/0"], capture_output=True)
    assert bad.returncode == 2 and b"--key" in bad.stderr
    bad = subprocess.run([*run, "--source", str(src), "--signal", "HUP"], capture_output=True)
    assert bad.returncode == 2 and b"--pid-file" in bad.stderr


async def test_a_file_changed_by_hand_is_put_back(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    sync = ConfigSync(ListSource(), dest, log=quiet)
    assert await sync.apply(Snapshot(b"from source\n", "1"))
    dest.write_bytes(b"edited by hand\n")
    assert await sync.apply(Snapshot(b"from source\n", "1"))
    assert dest.read_bytes() == b"from source\n"


def test_spec_component_runs_the_command() -> None:
    from podkit.system.components import component_argv, known_components

    assert "sidecar.config" in known_components()
    argv = component_argv("sidecar.config", {"source": "http://cfg/a", "path": "/etc/a.conf"})
    assert argv[-6:] == ["sidecar", "config", "--source", "http://cfg/a", "--path", "/etc/a.conf"]


async def test_kv_burst_ends_with_the_newest_value(tmp_path: Path) -> None:
    url, dest = f"memory://sidecar-burst-{time.monotonic_ns()}", tmp_path / "app.conf"
    kv = await open_kv(url)
    await kv.put("cfg", b"0")
    slow = [sys.executable, "-c", "import time; time.sleep(0.05)"]  # a validation takes time
    async with running(ConfigSync(KVSource(url, "cfg", POLL), dest, validate=slow, log=quiet)):
        await wait_for(reads(dest, b"0"), timeout=2)
        for i in range(1, 51):
            await kv.put("cfg", str(i).encode())
        await wait_for(reads(dest, b"50"), timeout=2, what="the newest value")
        await asyncio.sleep(0.2)
        assert dest.read_bytes() == b"50"  # no older value applied after it


def test_an_admin_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "src.conf"
    src.write_text("a = 1\n")
    argv = ["sidecar", "config", "--source", str(src), "--path", str(tmp_path / "app.conf")]
    with port_in_use() as port:
        error = f"sidecar: cannot listen on 127.0.0.1:{port} (--admin-port): Address already in use"
        assert podkit_error([*argv, "--admin-port", str(port)]) == (1, error)


async def test_an_on_change_command_is_heard_in_the_log(tmp_path: Path) -> None:
    lines: list[str] = []
    notifiers = [CommandNotifier(["sh", "-c", 'echo "reloaded $PODKIT_CONFIG_VERSION"'])]
    sync = ConfigSync(ListSource(), tmp_path / "app.conf", notifiers=notifiers, log=lines.append)
    assert await sync.apply(Snapshot(b"v\n", "v3"))
    assert any(line.endswith("said: reloaded v3") for line in lines), lines
