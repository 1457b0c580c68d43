"""The optional parts of `podkit lb`, assembled per worker from its flags.

`Features` holds the flags; `podkit.net.proxy.workers.serve(config, features=features)` calls
it in each worker, which gets a `Worker`: its filters (in the order of
`podkit.lb.filters`), its TLS context, and its background tasks (active health checks,
membership watchers, certificate reloads, the admin server on `admin_port + index`).

Nothing is installed that no flag asked for: with no feature flag the proxy has no filter
and its hot path stays as it is. The admin port adds a timing filter (metrics per try).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field, fields
from ssl import SSLContext
from typing import TYPE_CHECKING, Any

from podkit.lb.admin import AdminServer
from podkit.lb.breaker import Limits, RetryBudget
from podkit.lb.cache import ResponseCache
from podkit.lb.filters import BreakerFilter, CacheFilter, HealthFilter, RateLimitFilter, Timing
from podkit.lb.health import ActiveCheck, HostHealth, Outliers, SharedHealth, owner_of
from podkit.lb.members import DNSMembers, FileMembers, KVMembers, Members
from podkit.lb.policy import Upstream
from podkit.lb.ratelimit import Rate, RateLimiter, SharedBuckets
from podkit.net.proxy.engine import log as engine_log
from podkit.net.proxy.hooks import Filter
from podkit.net.proxy.workers import probe_port

if TYPE_CHECKING:
    from podkit.net.proxy.engine import Proxy, ProxyConfig

UNLIMITED = 1 << 30


def log(message: str, name: str = "podkit lb") -> None:
    """One line on stderr, led by who logs it (`podkit lb` -> "lb:")."""
    engine_log(name, message)


_AVAILABLE = re.compile(r"lb: available: (\d+) of (\d+) upstreams \(worker (\d+)\)")


def parse_available(line: str) -> tuple[int, int, int] | None:
    """A worker's availability line, `lb: available: 2 of 3 upstreams (worker 0)`, as
    (worker, available, members); None for any other line."""
    m = _AVAILABLE.fullmatch(line.strip())
    return (int(m[3]), int(m[1]), int(m[2])) if m else None


def worker_share(limit: int, workers: int) -> int:
    """One worker's part of a breaker limit for all `workers`: limit // workers, at
    least 1 (so with fewer slots than workers, each still admits one)."""
    return max(1, limit // max(1, workers))


def parse_host_port(value: str, flag: str) -> tuple[str, int]:
    """`NAME:PORT` -> (name, port); ValueError names the flag."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} {value!r}: expected NAME:PORT")
    return host, int(port)


@dataclass
class Features:
    """The feature flags of `podkit lb` (None or 0: off)."""

    health_path: str | None = None
    health_interval: float = 5.0
    health_timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    passive_health: bool = False  # outlier ejection even without active checks
    consecutive_5xx: int = 5
    consecutive_connect_failures: int = 3
    ejection_time: float = 30.0
    max_ejection_percent: float = 10.0
    cache_bytes: int = 0
    cache_entry_bytes: int = 1 << 20
    rate_limit: str | None = None
    rate_limit_by: str = "ip"
    global_rate_limit: str | None = None
    max_connections: int | None = None
    max_pending: int | None = None
    max_requests: int | None = None
    retry_budget: float | None = None  # percent
    tls_cert: str | None = None
    tls_key: str | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    members_file: str | None = None
    members_kv: str | None = None
    members_prefix: str | None = None
    members_dns: str | None = None
    members_interval: float = 0.25
    # made by `prepare` before the workers fork: their rate limits and host health are
    # the balancer's, not each worker's
    shared_rates: SharedBuckets | None = field(default=None, compare=False, repr=False)
    shared_health: SharedHealth | None = field(default=None, compare=False, repr=False)

    def prepare(self, config: ProxyConfig) -> None:
        """In the supervisor, before the workers fork: check the admin ports are free
        (ListenError names the one that is not), make the state the workers share."""
        if self.admin_port:
            for i in range(config.workers):
                probe_port(self.admin_host, self.admin_port + i, "--admin-port")
        if config.workers > 1 and (self.rate_limit or self.global_rate_limit):
            self.shared_rates = SharedBuckets()
        if config.workers > 1 and (self.health_path is not None or self.passive_health):
            self.shared_health = SharedHealth()

    def flags(self) -> dict[str, Any]:
        """The flags as plain values."""
        shared = ("shared_rates", "shared_health")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in shared}

    def check(self) -> None:
        """ValueError naming the first bad flag."""
        rates = (("--rate-limit", self.rate_limit), ("--global-rate-limit", self.global_rate_limit))
        for flag, text in rates:
            if text is not None:
                try:
                    Rate.parse(text)
                except ValueError as exc:
                    raise ValueError(f"{flag}: {exc}") from None
        try:
            RateLimiter(by=self.rate_limit_by)
        except ValueError as exc:
            raise ValueError(f"--rate-limit-by: {exc}") from None
        if self.health_path is not None:
            if not self.health_path.startswith("/"):
                raise ValueError(f"--health-path {self.health_path!r}: must start with /")
            try:
                self.active_check()
            except ValueError as exc:
                raise ValueError(f"--health-*: {exc}") from None
        if self.cache_bytes < 0 or self.cache_entry_bytes <= 0:
            raise ValueError("--cache-bytes and --cache-entry-bytes must be positive")
        for name in ("max_connections", "max_pending", "max_requests"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.retry_budget is not None and not 0 <= self.retry_budget <= 100:
            raise ValueError(f"--retry-budget {self.retry_budget}: a percent, 0 to 100")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_cert and self.tls_key:
            from podkit.net.tls import pair_problem

            problem = pair_problem(self.tls_cert, self.tls_key)  # the pair workers will load
            if problem is not None:
                raise ValueError(f"--tls-cert, --tls-key: {problem}")
        if self.admin_port is not None and not 0 <= self.admin_port < 65536:
            raise ValueError(f"--admin-port {self.admin_port}: not a port")
        if (self.members_kv is None) != (self.members_prefix is None):
            raise ValueError("--members-kv and --members-prefix go together")
        if self.members_dns is not None:
            parse_host_port(self.members_dns, "--members-dns")

    @property
    def members(self) -> bool:
        """Whether a membership source is given."""
        return bool(self.members_file or self.members_kv or self.members_dns)

    def active_check(self) -> ActiveCheck | None:
        if self.health_path is None:
            return None
        return ActiveCheck(
            self.health_path,
            self.health_interval,
            self.health_timeout,
            self.healthy_threshold,
            self.unhealthy_threshold,
        )

    def __call__(self, config: ProxyConfig, index: int) -> Worker:
        return Worker(self, config, index)


class Worker:
    """One worker's filters, TLS context and background tasks."""

    def __init__(self, features: Features, config: ProxyConfig, index: int = 0) -> None:
        f = self.features = features
        self.config = config
        self.index = index
        self.log = functools.partial(log, name=config.name)
        self.lb: Proxy | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._members: list[Members[Any]] = []
        self.rate = self.cache = self.health = self.breaker = None
        self.timing: Timing | None = None
        self.admin: AdminServer | None = None
        filters: list[Filter] = []
        if f.rate_limit or f.global_rate_limit:
            limiter = RateLimiter(
                f.rate_limit, f.global_rate_limit, by=f.rate_limit_by, shared=f.shared_rates
            )
            self.rate = RateLimitFilter(limiter)
            filters.append(self.rate)
        if f.cache_bytes:
            self.cache = CacheFilter(ResponseCache(f.cache_bytes, f.cache_entry_bytes))
            filters.append(self.cache)
        if f.health_path is not None or f.passive_health:
            outliers = Outliers(
                consecutive_5xx=f.consecutive_5xx,
                consecutive_connect_failures=f.consecutive_connect_failures,
                base_ejection_time=f.ejection_time,
                max_ejection_time=max(f.ejection_time, 300.0),
                max_ejection_percent=f.max_ejection_percent,
            )
            n = config.workers

            def checks_here(host: str) -> bool:
                return owner_of(host, n) == index

            shared = f.shared_health
            health = HostHealth(
                f.active_check(),
                outliers,
                shared=shared,
                checks_here=checks_here if shared is not None else None,
            )
            self.health = HealthFilter(health, log=self.log)
            filters.append(self.health)
        if f.admin_port is not None:
            port = f.admin_port + index if f.admin_port else 0
            siblings = (
                {j: f.admin_port + j for j in range(config.workers) if j != index}
                if f.admin_port
                else {}
            )
            self.admin = AdminServer(self, f.admin_host, port, siblings)
            self.timing = Timing(self.admin.metrics.record)
            filters.append(self.timing)
        limits = (f.max_connections, f.max_pending, f.max_requests)
        if any(v is not None for v in limits) or f.retry_budget is not None:
            # each worker holds its share, so the workers together stay within the limit
            mc, mp, mr = (
                UNLIMITED if v is None else worker_share(v, config.workers) for v in limits
            )
            budget = RetryBudget(percent=20.0 if f.retry_budget is None else f.retry_budget)
            self.breaker = BreakerFilter(Limits(mc, mp, mr), budget)
            filters.append(self.breaker)  # last: its admit holds slots (see filters.py)
        self.filters: Sequence[Filter] = filters
        self.ssl: SSLContext | None = None
        self._tls: Any = None
        if f.tls_cert and f.tls_key:
            from podkit.net.tls import ReloadingContext

            self._tls = ReloadingContext(f.tls_cert, f.tls_key, log=self.log)
            self.ssl = self._tls.context

    def describe(self) -> dict[str, Any]:
        """The configuration, for /status."""
        return {"proxy": asdict(self.config), "features": self.features.flags()}

    def set_members(self, upstreams: list[Upstream]) -> None:
        """New members: the proxy drains the leavers, health follows the new list."""
        lb = self.lb
        if lb is None:
            return
        lb.set_upstreams(upstreams)
        if self.health is not None:
            self.health.attach(lb)
        self.log(f"members: {', '.join(u.name for u in lb.upstreams) or '(none)'}")

    async def _report_available(self, tick: float = 0.05) -> None:
        """Log how many members can take requests whenever that changes (what a supervisor
        such as `podkit up` reads, with `parse_available`, to know the service routes)."""
        last: tuple[int, int] | None = None
        while True:
            ups = self.lb.upstreams if self.lb is not None else []
            now = (sum(1 for u in ups if u.available), len(ups))
            if now != last:
                self.log(f"available: {now[0]} of {now[1]} upstreams (worker {self.index})")
                last = now
            await asyncio.sleep(tick)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    def _follow(self, members: Members[Any]) -> None:
        self._members.append(members)
        self._spawn(members.run())

    async def start(self, lb: Proxy) -> None:
        """Attach to the worker's proxy and start the background tasks."""
        self.lb = lb
        f = self.features
        if self.health is not None:
            self.health.attach(lb)
            self._spawn(self.health.run())
        if f.members_file:
            watcher = FileMembers(
                f.members_file, self.set_members, interval=f.members_interval, log=self.log
            )
            await watcher.check()  # the first list before the worker serves
            self._follow(watcher)
        if f.members_kv and f.members_prefix:
            self._follow(KVMembers(f.members_kv, f.members_prefix, self.set_members, log=self.log))
        if f.members_dns:
            name, port = parse_host_port(f.members_dns, "--members-dns")
            interval = max(1.0, f.members_interval)
            self._follow(DNSMembers(name, port, self.set_members, interval=interval, log=self.log))
        if f.members:
            self._spawn(self._report_available())
        if self._tls is not None:
            self._spawn(self._tls.run())
        if self.admin is not None:
            await self.admin.start()
            self.log(f"admin on http://{self.admin.host}:{self.admin.port} (worker {self.index})")

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for members in self._members:
            await members.close()
        if self.admin is not None:
            await self.admin.close()
