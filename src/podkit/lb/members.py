"""Where the balancer learns its upstreams besides the command line: a file, a KV prefix
or a DNS name, all followed, so replicas can come and go (and register themselves)
without a restart.

- File: one upstream per line as `--upstream` takes it (`http://host:port`, optional
  `,weight=N`); blank lines and `# comments` are ignored. Rewrite it atomically (temp
  file + rename, as `podkit up` does); a change is seen within `interval`. A file with a
  bad line is refused whole (the error names the line) and the last good list stays.
- KV prefix: each key under the prefix holds one upstream in the same syntax; instances
  put their own key under a lease, so a crashed one disappears when its lease ends. The
  watch resumes after reconnects; a malformed value is skipped with a log line.
- DNS: every address of a name, re-resolved every `interval` (a headless Service's
  name on Kubernetes lists exactly the ready pods).

An empty list is applied too: the balancer then answers 503 until members return.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from podkit.backends import KV, BackendError, open_kv
from podkit.lb.policy import Upstream, parse_upstream

OnChange = Callable[[list[Upstream]], None]


class MembersError(ValueError):
    """A members file that cannot be used; the message names the file and line."""


def parse_members(text: str, source: str = "<members>") -> list[Upstream]:
    """Lines of upstreams -> Upstream objects; MembersError names the first bad line."""
    out: list[Upstream] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            up = parse_upstream(line)
        except ValueError as exc:
            raise MembersError(f"{source}:{n}: {exc}") from None
        if up.name in seen:
            raise MembersError(f"{source}:{n}: {up.name} is listed twice")
        seen.add(up.name)
        out.append(up)
    return out


def write_members(path: Path, upstreams: list[str]) -> None:
    """Replace a members file atomically (what a supervisor calls on every change)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{u}\n" for u in upstreams), encoding="utf-8")
    os.replace(tmp, path)


class FileMembers:
    """Polls a members file; calls `on_change` with every new valid list."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_change: OnChange,
        *,
        interval: float = 0.25,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.interval = interval
        self.log = log
        self._stamp: tuple[int, int, int] | None = None
        self.last_error: str | None = None

    def check(self) -> bool:
        """Read the file if it changed; True when a new list was applied."""
        try:
            st = self.path.stat()
        except OSError as exc:
            if self._stamp is not None or self.last_error is None:
                self.last_error = f"{self.path}: {exc.strerror}"
                self.log(f"members file unreadable, keeping the last list: {self.last_error}")
            self._stamp = None
            return False
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            members = parse_members(self.path.read_text(encoding="utf-8"), str(self.path))
        except (MembersError, OSError, UnicodeDecodeError) as exc:
            self.last_error = str(exc)
            self.log(f"members file refused, keeping the last list: {exc}")
            return False
        self.last_error = None
        self.on_change(members)
        return True

    async def run(self) -> None:
        """Check now, then every `interval` seconds until cancelled."""
        while True:
            self.check()
            await asyncio.sleep(self.interval)


class DNSMembers:
    """Resolves a name to all its addresses every `interval` seconds (a Kubernetes
    headless Service lists the ready pods of a Deployment this way); each address with
    `port` is an upstream. A failed lookup keeps the last list."""

    def __init__(
        self,
        name: str,
        port: int,
        on_change: OnChange,
        *,
        interval: float = 1.0,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.name = name
        self.port = port
        self.on_change = on_change
        self.interval = interval
        self.log = log
        self.addresses: list[str] | None = None

    async def check(self) -> bool:
        """Resolve now; True when the list changed and was applied."""
        import socket

        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self.log(f"members: cannot resolve {self.name}, keeping the last list: {exc}")
            return False
        addresses = sorted({str(info[4][0]) for info in infos})
        if addresses == self.addresses:
            return False
        self.addresses = addresses
        self.on_change([Upstream(a, self.port) for a in addresses])
        return True

    async def run(self) -> None:
        """Resolve now, then every `interval` seconds until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.interval)


class KVMembers:
    """Watches a KV prefix of upstreams; calls `on_change` with the whole list."""

    def __init__(
        self,
        kv: KV | str,
        prefix: str,
        on_change: OnChange,
        *,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self._kv = kv
        self.prefix = prefix
        self.on_change = on_change
        self.log = log
        self.members: dict[str, str] = {}

    async def _open(self) -> KV:
        if isinstance(self._kv, str):
            self._kv = await open_kv(self._kv)
        return self._kv

    def _apply(self) -> None:
        out: list[Upstream] = []
        for key, value in sorted(self.members.items()):
            try:
                out.append(parse_upstream(value))
            except ValueError as exc:
                self.log(f"members: {key}: skipped: {exc}")
        self.on_change(out)

    async def run(self) -> None:
        """Read the prefix, then follow its changes until cancelled; retries on outages."""
        kv = await self._open()
        while True:
            try:
                start = await kv.revision() + 1  # changes from here on are replayed
                entries = await kv.range(self.prefix)
                self.members = {e.key: e.value.decode("utf-8", "replace") for e in entries}
                self._apply()
                async for ev in kv.watch(self.prefix, prefix=True, start_revision=start):
                    old = self.members.get(ev.key)
                    if ev.kind == "put" and ev.value is not None:
                        self.members[ev.key] = ev.value.decode("utf-8", "replace")
                    else:
                        self.members.pop(ev.key, None)
                    if self.members.get(ev.key) != old:  # a replayed change changes nothing
                        self._apply()
            except (BackendError, OSError) as exc:
                self.log(f"members: {self.prefix} unreadable, keeping the last list: {exc}")
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if not isinstance(self._kv, str):
            with contextlib.suppress(BackendError, OSError):
                await self._kv.close()
