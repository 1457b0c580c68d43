"""Config sync: keep a file in a shared volume equal to a source, then tell the app.

    sync = ConfigSync(HTTPSource("http://cfg/app.conf"), Path("/etc/app/app.conf"),
                      validate=["nginx", "-t", "-c", "{}"],
                      notifiers=[SignalNotifier(signal.SIGHUP, Path("/run/app.pid"))])
    await sync.run()

Sources (each yields a `Snapshot` whenever its content may have changed):
- `FileSource`: a file, polled by mtime, size and inode, compared by hash;
- `HTTPSource`: a URL, polled with a conditional GET (`If-None-Match` with the last
  ETag; 304 means unchanged), through the proxy `http_proxy` or `https_proxy` names
  unless `no_proxy` lists the host;
- `KVSource`: a key in any KV backend, read once, then watched from the store's revision
  at the read (so no change is missed, and the start is never one compaction dropped).

Guarantees of `ConfigSync`:
- the file is replaced atomically (temp file in the same directory, fsync, rename), so a
  reader sees the old content or the new one, never a mix;
- it is written only when the content differs from what the file holds;
- a candidate that the validate command rejects (non-zero exit) is discarded and the old
  file stays; the reason is logged and kept in the status;
- a source that fails is retried with exponential back-off, and the file is never
  deleted or emptied meanwhile (nor when a KV key is deleted);
- after each write every notifier runs: a signal to the PID in a pid file, an HTTP
  request to a reload URL, or a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from podkit.aio import stop_task, wait_for
from podkit.backends import KV, BackendError, Event, open_kv
from podkit.clock import Clock, SystemClock
from podkit.net.client import ClientError, HTTPClient, Response
from podkit.net.forward_proxy import ProxySettings


class SourceError(Exception):
    """The source could not be read; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The source's content and its version (a hash, an ETag, or a KV revision)."""

    content: bytes
    version: str


def digest(content: bytes) -> str:
    """A short content hash: `sha256:` and 16 hex digits."""
    return "sha256:" + hashlib.sha256(content).hexdigest()[:16]


class Source(Protocol):
    """Where the config comes from."""

    description: str

    def snapshots(self) -> AsyncIterator[Snapshot]:
        """The current content, then new content as it changes; raises `SourceError`
        when the source fails (the caller backs off and iterates again)."""
        ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------- sources


class FileSource:
    """A file polled every `interval` seconds; a change of mtime, size or inode rereads it."""

    def __init__(self, path: Path, interval: float = 0.5, clock: Clock | None = None) -> None:
        self.path = path
        self.interval = interval
        self.clock = clock or SystemClock()
        self.description = f"file {path}"

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        seen: tuple[int, int, int] | None = None
        while True:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if stamp != seen:
                    content = self.path.read_bytes()
                    seen = stamp
                    yield Snapshot(content, digest(content))
            except OSError as exc:
                raise SourceError(f"{self.description}: {exc.strerror or exc}") from None
            await self.clock.sleep(self.interval)

    async def close(self) -> None:
        return None


class HTTPSource:
    """A URL polled every `interval` seconds with `If-None-Match: <last ETag>`.

    200 gives new content (version: its ETag, else its hash); 304 means unchanged (the
    last content is yielded again, which writes nothing); any other status, or no answer
    within `timeout`, is a `SourceError`. Requests go through the forward proxy the
    environment names for the URL's scheme (`http_proxy`, `https_proxy`), except to the
    hosts `no_proxy` lists (read when polling starts).
    """

    def __init__(
        self, url: str, interval: float = 1.0, timeout: float = 5.0, clock: Clock | None = None
    ) -> None:
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self.clock = clock or SystemClock()
        self.description = f"url {url}"
        self.etag: str | None = None
        self._last: Snapshot | None = None  # the content the ETag stands for
        self._client: HTTPClient | None = None

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        if self._client is None:
            self._client = HTTPClient(
                timeout=self.timeout,
                connect_timeout=self.timeout,
                proxies=ProxySettings.from_environment(),
            )
        while True:
            last = self._last
            headers = [("If-None-Match", self.etag)] if self.etag and last else []
            try:
                resp = await self._client.get(self.url, headers=headers)
            except (ClientError, TimeoutError, OSError) as exc:
                raise SourceError(f"{self.description}: {_why(exc, self.url)}") from None
            if resp.status == 200:
                etag = resp.header(b"etag")
                self.etag = etag.decode("latin-1") if etag is not None else None
                snap = Snapshot(resp.body, self.etag or digest(resp.body))
            elif resp.status == 304 and last is not None:
                snap = last  # unchanged: confirms the content (and `last_sync`)
            else:
                raise SourceError(f"{self.description}: {_status(resp)}")
            self._last = snap
            yield snap
            await self.clock.sleep(self.interval)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _why(exc: BaseException, url: str) -> str:
    """What went wrong with a request to `url` (the client's message names the URL,
    which the caller's own already does)."""
    return str(exc).removeprefix(f"{url}: ") or type(exc).__name__


def _status(resp: Response) -> str:
    return f"HTTP {resp.status} {resp.reason.decode('latin-1')}"


class _Latest:
    """The newest watch event (older ones are superseded), or the watch's failure."""

    def __init__(self) -> None:
        self.event: Event | None = None
        self.error: BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, event: Event) -> None:
        self.event = event
        self.ready.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ready.set()

    async def take(self) -> Event:
        await self.ready.wait()
        self.ready.clear()
        if self.error is not None:
            raise self.error
        event, self.event = self.event, None
        assert event is not None
        return event


class KVSource:
    """A key of a KV backend: read, then watched from the store's revision (the backend's
    watch resumes after reconnects; a failed watch makes the caller read again).

    The watch is drained in its own task, so a slow validation never holds it up, and
    values superseded meanwhile are skipped: only the newest is applied. Until the key
    exists it is read every `interval` seconds; a deletion keeps the file as it is and
    waits for the key to come back.
    """

    def __init__(
        self, url: str, key: str, interval: float = 0.5, clock: Clock | None = None
    ) -> None:
        self.url = url
        self.key = key
        self.interval = interval
        self.clock = clock or SystemClock()
        self.description = f"key {key!r} of {url}"
        self._kv: KV | None = None

    async def _drain(self, kv: KV, start: int, latest: _Latest) -> None:
        try:
            async for event in kv.watch(self.key, start_revision=start):
                latest.put(event)
        except Exception as exc:
            latest.fail(exc)

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        try:
            if self._kv is None:
                self._kv = await open_kv(self.url)
            kv = self._kv
            while True:
                start = await kv.revision() + 1  # recent: never compacted away
                entry = await kv.get(self.key)
                if entry is None:
                    await self.clock.sleep(self.interval)
                    continue
                yield Snapshot(entry.value, f"revision {entry.revision}")
                latest = _Latest()
                drain = asyncio.create_task(self._drain(kv, start, latest))
                try:
                    while True:
                        event = await latest.take()
                        if event.revision <= entry.revision:
                            continue  # a change the read already saw
                        if event.kind != "put":
                            break  # deleted: read again
                        assert event.value is not None
                        yield Snapshot(event.value, f"revision {event.revision}")
                finally:
                    await stop_task(drain)
        except (BackendError, OSError) as exc:
            raise SourceError(f"{self.description}: {exc}") from None

    async def close(self) -> None:
        if self._kv is not None:
            await self._kv.close()
            self._kv = None


def open_source(
    source: str, key: str | None = None, interval: float = 0.5, clock: Clock | None = None
) -> Source:
    """A source from its description: a path or file:// URL, an http(s):// URL, or a KV
    backend URL (then `key` is required)."""
    if source.startswith(("http://", "https://")):
        return HTTPSource(source, interval, clock=clock)
    if source.startswith("file://"):
        return FileSource(Path(source[len("file://") :]), interval, clock)
    if "://" in source:
        if not key:
            raise ValueError(f"source {source!r} is a KV backend URL: name the key with --key")
        return KVSource(source, key, interval, clock)
    return FileSource(Path(source), interval, clock)


# ---------------------------------------------------------------------------- notifiers


class Notifier(Protocol):
    """Tells the app that its config changed; raises `NotifyError` when it cannot."""

    description: str

    async def notify(self, path: Path, version: str) -> None: ...


class NotifyError(Exception):
    """A notification failed; the message says which and why."""


class SignalNotifier:
    """Sends `sig` to the PID read from `pid_file` at each change."""

    def __init__(self, sig: signal.Signals, pid_file: Path) -> None:
        self.sig = sig
        self.pid_file = pid_file
        self.description = f"{sig.name} to the pid in {pid_file}"

    async def notify(self, path: Path, version: str) -> None:
        try:
            words = self.pid_file.read_text().split()
            if not words:
                raise NotifyError(f"{self.description}: the pid file is empty")
            os.kill(int(words[0]), self.sig)
        except (OSError, ValueError) as exc:
            raise NotifyError(f"{self.description}: {exc}") from None


class HTTPNotifier:
    """Sends `method` (POST by default) to `url`, directly (the app is beside the sidecar,
    so no proxy); any 2xx answer is success."""

    def __init__(self, url: str, method: str = "POST", timeout: float = 5.0) -> None:
        self.url = url
        self.method = method.upper()
        self.timeout = timeout
        self.description = f"{self.method} {url}"

    async def notify(self, path: Path, version: str) -> None:
        headers = [("X-Podkit-Config-Version", version)]
        try:
            async with HTTPClient(timeout=self.timeout, connect_timeout=self.timeout) as client:
                resp = await client.request(self.method, self.url, headers=headers)
        except (ClientError, TimeoutError, OSError) as exc:
            raise NotifyError(f"{self.description}: {_why(exc, self.url)}") from None
        if not 200 <= resp.status < 300:
            raise NotifyError(f"{self.description}: {_status(resp)}")


class CommandNotifier:
    """Runs `argv` with PODKIT_CONFIG_PATH and PODKIT_CONFIG_VERSION in its environment;
    a non-zero exit is a failure."""

    def __init__(self, argv: Sequence[str], timeout: float = 30.0) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.description = f"command {shlex.join(self.argv)}"
        self.said = ""

    async def notify(self, path: Path, version: str) -> None:
        env = dict(os.environ, PODKIT_CONFIG_PATH=str(path), PODKIT_CONFIG_VERSION=version)
        code, output = await run_command(self.argv, env, self.timeout)
        if code != 0:
            raise NotifyError(f"{self.description} exited with {code}: {output}")
        self.said = output  # what the command printed, for the log


async def run_command(
    argv: Sequence[str], env: dict[str, str] | None, timeout: float
) -> tuple[int, str]:
    """Run `argv`; its exit code and the last 500 characters of its output (-1 on
    timeout or when it cannot start)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return -1, f"cannot start {argv[0]!r}: {exc.strerror or exc}"
    try:
        out, _ = await wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"timed out after {timeout}s"
    return proc.returncode or 0, out.decode(errors="replace").strip()[-500:]


# ---------------------------------------------------------------------------- the sync


def write_atomically(path: Path, content: bytes, mode: int = 0o644) -> Path:
    """Write `content` to a temp file beside `path` and fsync it; return the temp path
    (rename it over `path` with `commit`)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def commit(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path` and fsync the directory, so the rename is durable."""
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class SyncStatus:
    """What `GET /status` reports. Times are seconds since the epoch."""

    source: str
    path: str
    version: str | None = None  # of the content the file holds (as last synced)
    last_sync: float | None = None  # last successful read of the source
    last_change: float | None = None  # last write of the file
    last_error: str | None = None
    last_error_at: float | None = None
    source_up: bool = False
    writes: int = 0
    rejected: int = 0
    notify_failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


Log = Callable[[str], None]


def _stderr_log(message: str) -> None:
    print(f"sidecar config: {message}", file=sys.stderr, flush=True)


@dataclass
class Backoff:
    """Delays after consecutive failures: `initial * 2**n`, at most `maximum`."""

    initial: float = 0.1
    maximum: float = 10.0
    failures: int = field(default=0, init=False)

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2.0**self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class ConfigSync:
    """Keeps `path` equal to the source's content; validates, swaps, notifies."""

    def __init__(
        self,
        source: Source,
        path: Path,
        *,
        validate: Sequence[str] | None = None,
        notifiers: Sequence[Notifier] = (),
        backoff: Backoff | None = None,
        clock: Clock | None = None,
        log: Log = _stderr_log,
        validate_timeout: float = 30.0,
    ) -> None:
        self.source = source
        self.path = path
        self.validate = list(validate) if validate else None
        self.notifiers = list(notifiers)
        self.backoff = backoff or Backoff()
        self.clock = clock or SystemClock()
        self.log = log
        self.validate_timeout = validate_timeout
        self.status = SyncStatus(source=source.description, path=str(path))

    def _error(self, message: str, detail: str = "") -> None:
        """Record an error; log it unless it repeats the last one (`detail` aside)."""
        if message != self.status.last_error:
            self.log(message + detail)
        self.status.last_error = message
        self.status.last_error_at = time.time()

    def _validate_argv(self, candidate: Path) -> list[str]:
        assert self.validate is not None
        if "{}" in self.validate:
            return [str(candidate) if a == "{}" else a for a in self.validate]
        return [*self.validate, str(candidate)]

    async def apply(self, snap: Snapshot) -> bool:
        """Write `snap` if it differs from the file (after validation); True if written."""
        self.status.last_sync = time.time()
        self.status.source_up = True
        new_hash = digest(snap.content)
        if new_hash == await asyncio.to_thread(self._file_hash):  # the file as it is now
            self.status.version = snap.version
            return False
        mode = await asyncio.to_thread(self._file_mode)
        tmp = await asyncio.to_thread(write_atomically, self.path, snap.content, mode)
        try:
            if self.validate is not None:
                code, output = await run_command(
                    self._validate_argv(tmp), None, self.validate_timeout
                )
                if code != 0:
                    self.status.rejected += 1
                    self._error(
                        f"{snap.version} rejected by the validate command (exit {code}): "
                        f"{output or 'no output'}; keeping the current file"
                    )
                    return False
            await asyncio.to_thread(commit, tmp, self.path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.status.version = snap.version
        self.status.last_change = time.time()
        self.status.writes += 1
        self.status.last_error = None
        self.log(f"wrote {self.path} ({snap.version}, {len(snap.content)} bytes)")
        await self._notify(snap.version)
        return True

    async def _notify(self, version: str) -> None:
        for notifier in self.notifiers:
            try:
                await notifier.notify(self.path, version)
            except NotifyError as exc:
                self.status.notify_failures += 1
                self._error(f"notify failed: {exc}")
                continue
            said = getattr(notifier, "said", "")
            if said:  # an --on-change command's output (its last 500 characters)
                self.log(f"{notifier.description} said: {said}")

    def _file_hash(self) -> str:
        try:
            return digest(self.path.read_bytes())
        except OSError:
            return ""

    def _file_mode(self) -> int:
        try:
            return os.stat(self.path).st_mode & 0o7777
        except OSError:
            return 0o644

    async def run(self) -> None:
        """Sync until cancelled; a failing source is retried with back-off."""
        self.log(f"syncing {self.path} from {self.source.description}")
        while True:
            try:
                async for snap in self.source.snapshots():
                    self.backoff.reset()
                    await self.apply(snap)
                raise SourceError(f"{self.source.description}: ended")  # pragma: no cover
            except SourceError as exc:
                self.status.source_up = False
                delay = self.backoff.next()
                self._error(f"{exc}; keeping the last good config", f", retrying in {delay:.1f}s")
                await self.clock.sleep(delay)

    async def sync_once(self) -> bool:
        """Read the source once and apply it; True if the file was written."""
        snaps = self.source.snapshots()
        try:
            snap = await anext(snaps)
        finally:
            await snaps.aclose()  # type: ignore[attr-defined]
        return await self.apply(snap)

    async def close(self) -> None:
        await self.source.close()
