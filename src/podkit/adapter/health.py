"""Health checks behind /healthz and /readyz: SQL, Redis, HTTP and commands.

A `HealthMonitor` runs every check in the background once per `interval` (each bounded
by its timeout), so a probe reads the latest results and never waits on a slow
dependency. `/readyz` is 200 while every check passes and 503 naming the failures;
`/healthz` does the same for the checks marked `liveness` only (a database outage should
take a pod out of a Service, not restart it), so with none marked it is 200 while the
adapter runs.

Checks:
- `sql`: `postgresql://...` (asyncpg) or `mysql://...` (aiomysql); runs `query`
  (default `SELECT 1`) on a kept connection and, with `expect`, matches the first
  column of the first row against that regular expression;
- `redis`: PING, then INFO replication: a replica must have its link to the master up
  and, with `max_lag`, have heard from it within that many seconds;
- `http`: GET; a 2xx status (or `status`), and with `expect` a body matching it;
- `command`: exit status 0 within the timeout (the process group is killed after it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from podkit.aio import wait_for
from podkit.backends.url import mask


class CheckConfig(BaseModel):
    """One check: exactly one of sql, redis, http or command."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    sql: str | None = None
    redis: str | None = None
    http: str | None = None
    command: list[str] | str | None = None
    query: str = "SELECT 1"
    expect: str | None = None  # a regular expression
    status: int | None = None  # http: the exact status wanted (default: any 2xx)
    max_lag: float | None = Field(default=None, gt=0)  # redis replica: seconds
    timeout: float | None = Field(default=None, gt=0)
    liveness: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> CheckConfig:
        kinds = [k for k in ("sql", "redis", "http", "command") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(
                f"a check needs exactly one of sql, redis, http, command (got {kinds or 'none'})"
            )
        if self.expect is not None:
            re.compile(self.expect)
        if self.sql is not None and urlsplit(self.sql).scheme not in SQL_SCHEMES:
            raise ValueError(f"sql: {self.sql!r} is not a postgresql:// or mysql:// URL")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("sql", "redis", "http", "command") if getattr(self, k))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        target = getattr(self, self.kind)
        if isinstance(target, list):
            target = shlex.join(target)
        return f"{self.kind} {mask(str(target))}"


class HealthConfig(BaseModel):
    """A YAML health file: `interval` and `checks`."""

    model_config = ConfigDict(extra="forbid")

    interval: float = Field(default=5.0, gt=0)
    checks: list[CheckConfig] = Field(min_length=1)


SQL_SCHEMES = ("postgresql", "postgres", "mysql")


class CheckFailed(Exception):
    """A check ran and the dependency is not healthy; the message says why."""


@dataclass
class Result:
    """The latest outcome of one check."""

    name: str
    ok: bool
    detail: str
    ms: float
    at: float  # monotonic time it finished

    def as_json(self, now: float) -> dict[str, Any]:
        key = "detail" if self.ok else "error"
        return {"name": self.name, "ok": self.ok, key: self.detail,
                "ms": round(self.ms, 1), "age": round(now - self.at, 3)}  # fmt: skip


class _Check:
    """A runnable check: `await probe()` returns a detail or raises."""

    def __init__(self, cfg: CheckConfig, timeout: float) -> None:
        self.cfg = cfg
        self.name = cfg.label
        self.timeout = cfg.timeout or timeout
        self._conn: Any = None
        self._expect = re.compile(cfg.expect) if cfg.expect else None

    def _match(self, text: str) -> None:
        if self._expect is not None and not self._expect.search(text):
            raise CheckFailed(f"{text[:200]!r} does not match {self.cfg.expect!r}")

    async def probe(self) -> str:
        probe: Callable[[], Awaitable[str]] = getattr(self, f"_{self.cfg.kind}")
        return await probe()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                result = conn.aclose() if hasattr(conn, "aclose") else conn.close()
                if asyncio.iscoroutine(result):
                    await result

    async def _sql(self) -> str:
        url = self.cfg.sql
        assert url is not None
        try:
            if self._conn is None:
                self._conn = await self._connect_sql(url)
            value = await self._query(self.cfg.query)
        except CheckFailed:
            raise
        except Exception:
            await self.close()  # a broken connection: a new one next time
            raise
        text = "" if value is None else str(value)
        self._match(text)
        return f"{self.cfg.query!r} -> {text[:100]}"

    async def _connect_sql(self, url: str) -> Any:
        scheme = urlsplit(url).scheme
        if scheme in ("postgresql", "postgres"):
            import asyncpg  # type: ignore[import-untyped]

            return await asyncpg.connect(url, timeout=self.timeout)
        import aiomysql  # type: ignore[import-untyped]

        p = urlsplit(url)
        return await aiomysql.connect(
            host=p.hostname or "127.0.0.1", port=p.port or 3306, user=p.username or "root",
            password=p.password or "", db=p.path.lstrip("/") or None,
            connect_timeout=self.timeout, autocommit=True,
        )  # fmt: skip

    async def _query(self, query: str) -> Any:
        conn = self._conn
        if hasattr(conn, "fetchval"):  # asyncpg
            return await conn.fetchval(query)
        async with conn.cursor() as cur:
            await cur.execute(query)
            row = await cur.fetchone()
            return None if row is None else row[0]

    async def _redis(self) -> str:
        from redis.asyncio import Redis

        if self._conn is None:
            self._conn = Redis.from_url(
                self.cfg.redis or "", socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
            )  # fmt: skip
        try:
            await self._conn.ping()
            info = await self._conn.info("replication")
        except Exception:
            await self.close()
            raise
        role = info.get("role")
        if role == "slave":
            link = info.get("master_link_status")
            if link != "up":
                raise CheckFailed(f"replica: link to the master is {link}")
            lag = info.get("master_last_io_seconds_ago", -1)
            if self.cfg.max_lag is not None and (lag < 0 or lag > self.cfg.max_lag):
                raise CheckFailed(f"replica: last heard from the master {lag} s ago")
            return f"replica of {info.get('master_host')}:{info.get('master_port')}, link up"
        return f"{role}, {info.get('connected_slaves', 0)} replicas"

    async def _http(self) -> str:
        from podkit.net.client import HTTPClient

        async with HTTPClient(timeout=self.timeout) as client:  # a new connection each check
            r = await client.get(self.cfg.http or "")
        body = r.text()
        wanted = self.cfg.status
        if (wanted is None and not 200 <= r.status < 300) or (wanted and r.status != wanted):
            raise CheckFailed(f"HTTP {r.status}: {body[:200]!r}")
        self._match(body)
        return f"HTTP {r.status}"

    async def _command(self) -> str:
        argv = self.cfg.command
        argv = shlex.split(argv) if isinstance(argv, str) else list(argv or [])
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:  # the timeout: end the whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        text = out.decode("utf-8", "replace").strip()
        if proc.returncode != 0:
            raise CheckFailed(f"exit {proc.returncode}: {text[-200:]}")
        self._match(text)
        return f"exit 0{': ' + text[-100:] if text else ''}"


@dataclass
class HealthMonitor:
    """Runs the checks every `interval` seconds; answers /healthz and /readyz."""

    checks: list[CheckConfig]
    interval: float = 5.0
    results: dict[str, Result] = field(default_factory=dict)
    rounds: int = 0

    def __post_init__(self) -> None:
        timeout = max(0.05, self.interval * 0.8)  # a result always lands within the interval
        self._checks = [_Check(c, min(c.timeout or timeout, timeout)) for c in self.checks]
        names = [c.name for c in self._checks]
        if len(set(names)) != len(names):
            raise ValueError(f"check names must differ: {names}")
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> None:
        """Run every check now, concurrently."""
        await asyncio.gather(*(self._run(c) for c in self._checks))
        self.rounds += 1

    async def _run(self, check: _Check) -> None:
        t0 = time.monotonic()
        try:
            detail = await wait_for(check.probe(), check.timeout)
            ok = True
        except TimeoutError:
            await check.close()
            ok, detail = False, f"no answer within {check.timeout:g} s"
        except CheckFailed as exc:
            ok, detail = False, str(exc)
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}".strip(": ")
        now = time.monotonic()
        self.results[check.name] = Result(check.name, ok, detail, (now - t0) * 1000, now)

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.run_once()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for c in self._checks:
            await c.close()

    def report(self, which: Literal["ready", "live"]) -> tuple[int, dict[str, Any]]:
        """(200 or 503, a JSON body naming every check and the failed ones)."""
        now = time.monotonic()
        names = [c.name for c in self._checks if which == "ready" or c.cfg.liveness]
        if which == "ready" and self.rounds == 0:
            return 503, {"status": "starting", "failed": [], "checks": []}
        rows = [self.results[n] for n in names if n in self.results]
        failed = [r.name for r in rows if not r.ok]
        body = {
            "status": "fail" if failed else "ok",
            "failed": failed,
            "checks": [r.as_json(now) for r in rows],
        }
        return (503 if failed else 200), body
