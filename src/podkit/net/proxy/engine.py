"""The proxy engine: an HTTP/1.1 reverse proxy on asyncio protocols.

`podkit lb`, `podkit sidecar tls` and `podkit ambassador split` are this engine with a
policy, filters and TLS of their own (`Proxy(config, policy=..., filters=...)`).

The hot path, for a keep-alive GET on a warm pool, is two `data_received` calls and two
writes, without a task, a future or a timer:

1. `ClientConnection.data_received` feeds the bytes to the `RequestParser`; its callbacks
   make one `Exchange` per request (body pieces wait in `Exchange.pending` until an
   upstream is attached). After the feed the exchange is dispatched: the policy picks an
   upstream, its pool hands an idle connection over synchronously, and the rewritten head
   and any body already read go out in one write.
2. `UpstreamConnection.data_received` feeds the answer to its `ResponseParser`; the
   rewritten response head and body pieces collect in a list and go to the client in one
   write per read. When the response ends, the upstream connection goes back to its pool
   and the client's next (pipelined) request, if any, is dispatched.

Only a cold pool costs a task (the connect). Timeouts are not timers: a sweeper runs every
`tick` seconds and compares each connection's last activity (a flag the hot path sets)
with the limits, so a request costs no timer handle.

Rewriting: hop-by-hop headers (and those the Connection header names, but never the
framing fields Content-Length, Transfer-Encoding, Host and Upgrade) are dropped in both
directions, `X-Forwarded-For` gets the client address appended, `X-Forwarded-Proto` is set.
A chunked body is re-chunked piece by piece; an upstream body that runs until close is
chunked toward an HTTP/1.1 client. `Upgrade` requests (WebSocket) become byte tunnels
after the upstream's 101; an Upgrade request with a body loses its upgrade and goes as a
plain request, and after any answer but 101 to an Upgrade request the upstream connection
is closed.

Framing: one answer per request. An upstream connection goes back to its pool only when
its answer ended exactly where its bytes did; bytes after a complete answer (a second
answer in the same write, the start of one) or on an idle connection go to no client:
the connection is closed and the event counted (`Proxy.surplus`) and logged.

Failures: no available upstream 503; connect refused, reset before the answer, or an
invalid answer (bad framing, a NUL or CR in a header) 502; no answer within
`upstream_timeout` 504; each with a one-line body naming the upstream and what happened.
A connect failure is retried on another upstream for any request (nothing was sent); an
invalid answer is never retried (the upstream got the request and may have run it); a
reset or a timeout before any byte of the answer is retried for
idempotent requests and ones marked `x-podkit-retry: 1` (a body up to `REPLAY_LIMIT` is
kept to send again), within a budget (20% of the requests of the last 10 s, plus 10 a
second: `podkit.net.proxy.retry.RetryRate`). A retry goes to an upstream not tried yet at once;
when each was tried, it waits a jittered back-off (`retry_backoff`). Bad requests get
400/414/431/501, then the connection closes; slow or idle clients get 408 or are closed.

The per-request pipeline (`podkit.net.proxy.hooks.Filter`) is where caching, rate limits,
circuit breakers and passive health plug in.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_module
import sys
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

from podkit.net.http import RequestHead
from podkit.net.pool import ConnectionPool
from podkit.net.proxy.clientconn import ClientConnection
from podkit.net.proxy.config import ProxyConfig
from podkit.net.proxy.exchange import Exchange
from podkit.net.proxy.hooks import Filter, observes_responses
from podkit.net.proxy.retry import RetryRate
from podkit.net.proxy.upstream import Policy, RoundRobin, Upstream, parse_upstream
from podkit.net.proxy.upstreamconn import UpstreamConnection
from podkit.net.tlsconn import TLSConnection

REPORT_EVERY = 10.0  # seconds between two logged failed answers (the rest are counted)

__all__ = ["Exchange", "Proxy", "ProxyConfig", "listen_socket", "log"]


class Proxy:
    """One worker's proxy: a listening socket, the upstreams and their pools, the sweeper.
    `policy` picks the upstream of each try (round-robin unless given)."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        policy: Policy | None = None,
        filters: Sequence[Filter] = (),
    ) -> None:
        self.config = config
        self.upstreams: list[Upstream] = [parse_upstream(u) for u in config.upstreams]
        self.policy = policy if policy is not None else self.default_policy(self.upstreams)
        if policy is not None:
            policy.set_upstreams(self.upstreams)
        for u in self.upstreams:
            u.pool = self._pool(u)
        self.filters: list[Filter] = list(filters)
        # the filters that must see a response head; with none, answers take the fast path
        self.response_filters: list[Filter] = [f for f in filters if observes_responses(f)]
        self.scheme = config.scheme.encode()
        self.clients: set[ClientConnection] = set()
        self.fast_heads: dict[bytes, tuple[int, int]] = {}  # UpstreamConnection._fast's memo
        self.request_heads: dict[bytes, RequestHead] = {}  # parsed heads by their bytes
        self.closing = False
        self.now = 0.0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.requests = 0  # tries ended
        self.retry_rate = RetryRate(config.retry_percent, config.retry_per_second)
        self.surplus = 0  # upstream connections closed for bytes after an answer
        self.unreported = 0  # failed answers not logged yet
        self.last_failure = ""  # the newest of them (status: detail)
        self.next_report = 0.0  # when they may be logged

    def default_policy(self, upstreams: list[Upstream]) -> Policy:
        """The policy when none is given: round-robin."""
        return RoundRobin(upstreams)

    def report_failure(self, status: int, detail: str) -> None:
        """Count an answer of 5xx the balancer gave itself; log it now unless one was
        logged within REPORT_EVERY s (then the sweeper logs the count when that ends)."""
        self.unreported += 1
        self.last_failure = f"{status}: {detail}"
        if self.now >= self.next_report:
            self._report()

    def _report(self) -> None:
        more = self.unreported - 1
        tail = f" (and {more} more since the last report)" if more else ""
        self.log(f"answered {self.last_failure}{tail}")
        self.unreported = 0
        self.next_report = self.now + REPORT_EVERY

    def _pool(self, u: Upstream) -> ConnectionPool[UpstreamConnection]:
        return ConnectionPool(
            u.host,
            u.port,
            lambda: UpstreamConnection(self),
            max_idle=self.config.max_idle_per_upstream,
            connect_timeout=self.config.connect_timeout,
        )

    def log(self, message: str) -> None:
        log(self.config.name, message)

    def surplus_answer(self, upstream: str, size: int) -> None:
        """An upstream sent bytes after a complete answer, or while idle: its connection
        is closed, the bytes go to no client. Counted; logged at the 1st, 2nd, 4th, 8th..."""
        self.surplus += 1
        n = self.surplus
        if n & (n - 1) == 0:
            what = f"{size} bytes" if size else "bytes"
            self.log(
                f"upstream {upstream} sent {what} after a complete answer or while idle; "
                f"its connection was closed ({n} so far)"
            )

    # --- membership ---
    def set_upstreams(self, upstreams: Iterable[Upstream]) -> None:
        """Replace the members. A member that leaves gets no new request and is drained:
        its exchanges in flight finish, its idle connections close."""
        new = list(upstreams)
        keep = {u.name: u for u in self.upstreams}
        merged: list[Upstream] = []
        for u in new:
            old = keep.pop(u.name, None)
            if old is not None:
                old.weight = u.weight
                merged.append(old)
            else:
                u.pool = self._pool(u)
                merged.append(u)
        for gone in keep.values():
            gone.available = False
            if gone.pool is not None:
                gone.pool.close()
        self.upstreams = merged
        self.policy.set_upstreams(merged)

    def end_try(self, ex: Exchange, status: int | None, error: str | None) -> None:
        """One try with `ex.upstream` is over: count it, tell the filters."""
        up = ex.upstream
        if up is None:
            return
        ex.upstream = None
        up.inflight -= 1
        self.requests += 1
        if self.filters:
            for f in self.filters:
                f.on_done(ex, up, status, error)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- serving ---
    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:  # type: ignore[attr-defined]
            return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.config.port

    async def start(
        self, sock: socket.socket | None = None, ssl: ssl_module.SSLContext | None = None
    ) -> None:
        """Listen (on `sock` when given); with `ssl`, clients speak TLS."""
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        self.retry_rate.observe(self.now, self.requests)
        if sock is None:
            sock = listen_socket(
                self.config.host, self.config.port, self.config.reuse_port, self.config.backlog
            )
        context = ssl

        def connection() -> asyncio.Protocol:
            client = ClientConnection(self)
            return client if context is None else TLSConnection(context, client)

        self._server = await loop.create_server(connection, sock=sock, backlog=self.config.backlog)
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        last_pool_sweep = loop.time()
        while True:
            await asyncio.sleep(cfg.tick)
            now = self.now = loop.time()
            self.retry_rate.observe(now, self.requests)
            if self.unreported and now >= self.next_report:
                self._report()  # failures counted in the last window, none since
            for c in list(self.clients):
                try:
                    c.check(now, cfg)
                except Exception as exc:  # pragma: no cover - a bug must not stop the sweeper
                    self.log(f"internal error in the sweeper: {exc!r}")
            if now - last_pool_sweep > 1.0:
                last_pool_sweep = now
                for u in self.upstreams:
                    if u.pool is not None:
                        u.pool.close_idle(now - cfg.pool_idle_timeout)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; let exchanges in flight finish (up to `grace` s); close all."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for c in list(self.clients):
            if c.ex is None and c.tunnel is None and c.transport is not None:
                c.transport.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.ex is not None for c in self.clients) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for c in list(self.clients):
            c.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for t in list(self._tasks):
            t.cancel()
        for u in self.upstreams:
            if u.pool is not None:
                u.pool.close()


def log(name: str, message: str) -> None:
    """One line on stderr, led by who serves (`podkit sidecar tls` -> "sidecar tls:")."""
    print(f"{name.removeprefix('podkit ')}: {message}", file=sys.stderr, flush=True)


def listen_socket(
    host: str, port: int, reuse_port: bool = True, backlog: int = 1024
) -> socket.socket:
    """A listening TCP socket; with `reuse_port`, several processes can share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
