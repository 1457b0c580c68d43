"""An app's native stats as Prometheus metrics: Redis INFO, PostgreSQL statistics views,
or any JSON stats endpoint through a mapping file.

A `Source` returns `Sample`s when asked; `Exporter` asks at scrape time (so values are
never older than the scrape) and renders them with prometheus-client, adding
`podkit_adapter_up{source}` (0 when the app could not be read, with the error logged)
and `podkit_adapter_scrape_seconds{source}`.

- Redis: every numeric INFO field is a gauge `redis_<field>`, except the cumulative ones
  (`total_*`, `*_hits`, `*_misses`, `expired_keys`, ...), which are counters; keyspace
  lines give `redis_db_keys{db}` and `redis_db_expiring_keys{db}`; `cmdstat_*` gives
  `redis_command_calls_total{cmd}` and `redis_command_seconds_total{cmd}`; role and
  version are labels of `redis_instance_info`.
- PostgreSQL: `pg_stat_database` per database (backends as a gauge, the rest counters:
  commits, rollbacks, blocks read and hit, tuples, conflicts, temp files, deadlocks),
  `pg_stat_activity` connections by database and state, database sizes, and
  `pg_up_since_seconds`.
- JSON: a mapping file lists metrics, each `{name, type: gauge|counter, help, path,
  labels}`; `path` is dotted keys where `*` matches every key of an object or item of a
  list, and `labels` names the `*`s in order. Booleans count as 0/1; a value that is not
  a number is skipped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field, field_validator

from podkit.aio import wait_for

Kind = Literal["gauge", "counter"]
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


@dataclass(frozen=True)
class Sample:
    """One value: counters are named without the `_total` suffix."""

    name: str
    kind: Kind
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


class Source(Protocol):
    """Something that reads an app's stats."""

    name: str

    async def collect(self) -> list[Sample]: ...

    async def close(self) -> None: ...


# -- Redis ------------------------------------------------------------------------------------

_REDIS_COUNTERS = re.compile(
    r"^(total_.*|.*_hits|.*_misses|expired_.*|evicted_.*|rejected_connections|"
    r"sync_full|sync_partial_ok|sync_partial_err|.*_received|.*_processed|"
    r"io_threaded_.*_processed|errorstat_.*|unexpected_error_replies|dump_payload_sanitizations)$"
)


def _clean(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name).lower()


def parse_redis_info(text: str) -> list[Sample]:
    """INFO's text -> samples; lines it does not understand are skipped, never fatal."""
    out: list[Sample] = []
    info: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        if not key:
            continue
        if re.fullmatch(r"db\d+", key):
            fields = dict(p.partition("=")[::2] for p in value.split(","))
            for f, metric in (("keys", "redis_db_keys"), ("expires", "redis_db_expiring_keys")):
                number = _number(fields.get(f, ""))
                if number is not None:
                    out.append(Sample(metric, "gauge", f"Keys ({f}) in a database.", number,
                                      (("db", key),)))  # fmt: skip
            continue
        if key.startswith("cmdstat_"):
            fields = dict(p.partition("=")[::2] for p in value.split(","))
            cmd = (("cmd", key[len("cmdstat_") :]),)
            calls, usec = _number(fields.get("calls", "")), _number(fields.get("usec", ""))
            if calls is not None:
                out.append(Sample("redis_command_calls", "counter", "Calls of a command.",
                                  calls, cmd))  # fmt: skip
            if usec is not None:
                out.append(Sample("redis_command_seconds", "counter",
                                  "Time spent in a command.", usec / 1e6, cmd))  # fmt: skip
            continue
        info[key] = value.strip()
        number = _number(value)
        if number is None:
            continue
        name = _clean(key)
        if _REDIS_COUNTERS.match(name):
            base = name[len("total_") :] if name.startswith("total_") else name
            out.append(Sample(f"redis_{base}", "counter", f"INFO {key}.", number))
        else:
            out.append(Sample(f"redis_{name}", "gauge", f"INFO {key}.", number))
    labels = tuple(
        (k, info[k]) for k in ("role", "redis_version", "redis_mode") if k in info
    )  # fmt: skip
    out.append(Sample("redis_instance_info", "gauge", "Role and version.", 1.0, labels))
    return out


def _number(text: str) -> float | None:
    text = text.strip()
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        return None
    return float(text)


class RedisSource:
    """INFO everything from one Redis server."""

    name = "redis"

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        from redis.asyncio import Redis

        self.url = url
        self._r = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        # the text as it is, not redis-py parse of it
        self._r.set_response_callback("INFO", lambda raw, **_: raw)  # type: ignore[arg-type]

    async def collect(self) -> list[Sample]:
        raw = await self._r.execute_command("INFO", "everything")  # type: ignore[no-untyped-call]
        return parse_redis_info(raw.decode("utf-8", "replace"))

    async def close(self) -> None:
        await self._r.aclose()


# -- PostgreSQL -------------------------------------------------------------------------------

_PG_DATABASE = {
    "numbackends": ("gauge", "Backends connected to the database."),
    "xact_commit": ("counter", "Transactions committed."),
    "xact_rollback": ("counter", "Transactions rolled back."),
    "blks_read": ("counter", "Disk blocks read."),
    "blks_hit": ("counter", "Blocks found in the buffer cache."),
    "tup_returned": ("counter", "Rows returned by queries."),
    "tup_fetched": ("counter", "Rows fetched by queries."),
    "tup_inserted": ("counter", "Rows inserted."),
    "tup_updated": ("counter", "Rows updated."),
    "tup_deleted": ("counter", "Rows deleted."),
    "conflicts": ("counter", "Queries cancelled by recovery conflicts."),
    "temp_files": ("counter", "Temporary files created."),
    "temp_bytes": ("counter", "Bytes written to temporary files."),
    "deadlocks": ("counter", "Deadlocks detected."),
}


class PostgresSource:
    """pg_stat_database, pg_stat_activity and database sizes, on one kept connection."""

    name = "postgres"

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url
        self.timeout = timeout
        self._conn: Any = None

    async def collect(self) -> list[Sample]:
        import asyncpg  # type: ignore[import-untyped]

        try:
            if self._conn is None:
                self._conn = await asyncpg.connect(self.url, timeout=self.timeout)
            return await self._collect(self._conn)
        except Exception:
            await self.close()  # broken: a new connection at the next scrape
            raise

    async def _collect(self, conn: Any) -> list[Sample]:
        out: list[Sample] = []
        cols = ", ".join(_PG_DATABASE)
        rows = await conn.fetch(
            f"SELECT datname, {cols} FROM pg_stat_database WHERE datname IS NOT NULL"
        )
        for row in rows:
            db = (("datname", row["datname"]),)
            for col, (kind, text) in _PG_DATABASE.items():
                if row[col] is not None:
                    kind_: Kind = "gauge" if kind == "gauge" else "counter"
                    out.append(Sample(f"pg_stat_database_{col}", kind_, text, float(row[col]), db))
        for row in await conn.fetch(
            "SELECT coalesce(datname, '') AS datname, coalesce(state, 'unknown') AS state, "
            "count(*) AS n FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "GROUP BY 1, 2"
        ):
            out.append(Sample("pg_stat_activity_count", "gauge", "Connections by state.",
                              float(row["n"]),
                              (("datname", row["datname"]), ("state", row["state"]))))  # fmt: skip
        for row in await conn.fetch(
            "SELECT datname, pg_database_size(datname) AS size FROM pg_database WHERE datallowconn"
        ):
            out.append(Sample("pg_database_size_bytes", "gauge", "Size of a database.",
                              float(row["size"]), (("datname", row["datname"]),)))  # fmt: skip
        up = await conn.fetchval("SELECT extract(epoch FROM now() - pg_postmaster_start_time())")
        out.append(Sample("pg_up_since_seconds", "gauge", "Seconds since the server started.",
                          float(up)))  # fmt: skip
        return out

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=self.timeout)
            except Exception:
                conn.terminate()


# -- JSON -------------------------------------------------------------------------------------


class JSONMetric(BaseModel):
    """One metric of a JSON mapping file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: Kind = "gauge"
    help: str = ""
    path: str
    labels: list[str] = []

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not METRIC_NAME.match(value):
            raise ValueError(f"{value!r} is not a Prometheus metric name")
        return value.removesuffix("_total")

    def wildcards(self) -> int:
        return self.path.split(".").count("*")


class JSONMapping(BaseModel):
    """A JSON mapping file: `metrics: [...]`."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[JSONMetric] = Field(min_length=1)

    @field_validator("metrics")
    @classmethod
    def _labels_match(cls, value: list[JSONMetric]) -> list[JSONMetric]:
        for m in value:
            if len(m.labels) != m.wildcards():
                raise ValueError(
                    f"{m.name}: path {m.path!r} has {m.wildcards()} '*' but {len(m.labels)} labels"
                )
        return value


Found = tuple[tuple[str, ...], Any]


def _walk(data: Any, parts: list[str], found: tuple[str, ...]) -> Iterator[Found]:
    if not parts:
        yield found, data
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        items: list[tuple[str, Any]] = []
        if isinstance(data, dict):
            items = [(str(k), v) for k, v in data.items()]
        elif isinstance(data, list):
            items = [(str(i), v) for i, v in enumerate(data)]
        for key, value in items:
            yield from _walk(value, rest, (*found, key))
    elif isinstance(data, dict) and head in data:
        yield from _walk(data[head], rest, found)
    elif isinstance(data, list) and head.isdigit() and int(head) < len(data):
        yield from _walk(data[int(head)], rest, found)


def map_json(data: Any, mapping: JSONMapping) -> list[Sample]:
    """Apply a mapping to a JSON document."""
    out: list[Sample] = []
    for m in mapping.metrics:
        for keys, value in _walk(data, m.path.split("."), ()):
            if isinstance(value, bool):
                value = 1.0 if value else 0.0
            if not isinstance(value, int | float):
                continue
            labels = tuple(zip(m.labels, keys, strict=True))
            out.append(Sample(m.name, m.type, m.help or m.path, float(value), labels))
    return out


class JSONSource:
    """GET a JSON stats URL and map it."""

    name = "json"

    def __init__(self, url: str, mapping: JSONMapping, timeout: float = 2.0) -> None:
        self.url = url
        self.mapping = mapping
        self.timeout = timeout

    async def collect(self) -> list[Sample]:
        from podkit.net.client import ClientError, HTTPClient

        async with HTTPClient(timeout=self.timeout) as client:
            r = await client.get(self.url)
        if r.status >= 400:
            raise ClientError(f"{self.url}: answered {r.status} {r.reason.decode()}")
        return map_json(r.json(), self.mapping)

    async def close(self) -> None:
        return None


# -- exposition -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Snapshot:
    """A collector that yields the samples of the last scrape."""

    samples: list[Sample] = field(default_factory=list)

    def collect(self) -> Iterator[Metric]:
        families: dict[tuple[str, str], Metric] = {}
        label_names: dict[tuple[str, str], tuple[str, ...]] = {}
        for s in self.samples:
            key = (s.name, s.kind)
            names = tuple(k for k, _ in s.labels)
            if key not in families:
                cls = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                families[key] = cls(s.name, s.help, labels=list(names))
                label_names[key] = names
            if label_names[key] != names:
                continue  # a family keeps one label set
            families[key].add_metric([v for _, v in s.labels], s.value)  # type: ignore[attr-defined]
        yield from families.values()


class Exporter:
    """Reads a source at every scrape and renders Prometheus text."""

    def __init__(self, source: Source, timeout: float = 5.0) -> None:
        import asyncio

        self.source = source
        self.timeout = timeout
        self.last_error: str | None = None
        self._snapshot = _Snapshot()
        self._meta = _Snapshot()
        self.registry = CollectorRegistry()
        self.registry.register(self._snapshot)
        self.registry.register(self._meta)
        self._lock = asyncio.Lock()

    async def scrape(self) -> bytes:
        """Collect now and return the exposition text."""

        async with self._lock:  # concurrent scrapes share one read of the app
            t0 = time.monotonic()
            try:
                samples = await wait_for(self.source.collect(), self.timeout)
                up, self.last_error = 1.0, None
            except Exception as exc:
                samples, up = [], 0.0
                self.last_error = f"{type(exc).__name__}: {exc}".strip(": ")
            src = (("source", self.source.name),)
            self._snapshot.samples = samples
            self._meta.samples = [
                Sample("podkit_adapter_up", "gauge", "1 if the app could be read.", up, src),
                Sample(
                    "podkit_adapter_scrape_seconds",
                    "gauge",
                    "Time to read the app.",
                    time.monotonic() - t0,
                    src,
                ),
            ]
            return generate_latest(self.registry)
