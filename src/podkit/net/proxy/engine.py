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
import random
import socket
import ssl as ssl_module
import sys
from collections import deque
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from podkit.net.http import (
    HOP_BY_HOP,
    LAST_CHUNK,
    HTTPError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    last_chunk,
    simple_response,
)
from podkit.net.pool import ConnectionPool, PooledConnection
from podkit.net.proxy.hooks import BodyObserver, Filter, observes_responses
from podkit.net.proxy.retry import RetryRate, is_retryable
from podkit.net.proxy.upstream import Policy, RoundRobin, Upstream, parse_upstream
from podkit.net.tlsconn import TLSConnection

PENDING_LIMIT = 256 * 1024  # request bytes held for an upstream before reading pauses
REPLAY_LIMIT = 64 * 1024  # request body bytes kept to send again on a retry
BACKOFF_BASE = 0.025  # a retry to an upstream already tried waits about this, doubling
BACKOFF_MAX = 0.25


def retry_backoff(tries: int, draw: float) -> float:
    """Seconds to wait after `tries` tries before a retry to an upstream already tried:
    `BACKOFF_BASE * 2**(tries - 1)`, capped at `BACKOFF_MAX`, then between half and all
    of it (`draw` in [0, 1) picks where)."""
    ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** max(0, tries - 1))
    return ceiling * (0.5 + 0.5 * draw)


MEMO_HEAD_LIMIT = 2048  # request heads up to this size are remembered by their bytes
REPORT_EVERY = 10.0  # seconds between two logged failed answers (the rest are counted)
MEMO_SIZE = 1024  # remembered request heads (and response head verdicts: 512) per worker
_ERROR_HEAD = RequestHead(b"", b"", "1.1", [], keep_alive=False)
WAIVERS = "podkit.waivers"  # Exchange.user keys of Exchange.waive_response
EXTRA_HEAD = "podkit.extra_head"


@dataclass
class ProxyConfig:
    """Everything one worker needs; the flags of `podkit lb` and the sidecar map onto these."""

    upstreams: list[str]
    host: str = "127.0.0.1"
    port: int = 8080
    policy: str = "round-robin"  # podkit lb's policy by name (`podkit.lb.policy`)
    hash_on: str | None = None
    workers: int = 1
    scheme: str = "http"  # what X-Forwarded-Proto says
    name: str = "podkit lb"  # who signs the balancer's own answers (400, 502, ...)
    idle_timeout: float = 60.0  # a keep-alive client between requests
    header_timeout: float = 10.0  # from the first byte of a request head to its end
    body_timeout: float = 30.0  # a pause while a request body is read
    send_timeout: float = 30.0  # a client that does not read its response
    connect_timeout: float = 2.0
    upstream_timeout: float = 60.0  # a pause while an upstream answers (per try)
    request_timeout: float = 0.0  # complete request to answer head, all tries (0: none)
    tunnel_timeout: float = 3600.0  # an Upgrade tunnel with no traffic either way
    pool_idle_timeout: float = 30.0  # idle pooled upstream connections are closed after
    max_idle_per_upstream: int = 128
    tries: int = 3  # attempts per request (retries only when safe, see the module doc)
    retry_percent: float = 20.0  # retry budget: retries per requests over 10 s, in percent,
    retry_per_second: float = 10.0  # plus this many a second (`podkit.net.proxy.retry.RetryRate`)
    tick: float = 0.25  # how often the sweeper checks timeouts
    reuse_port: bool = True
    backlog: int = 1024
    limits: dict[str, int] = field(default_factory=dict)  # RequestParser limits


class Exchange:
    """One request and its answer; also the context the pipeline's filters receive."""

    __slots__ = (
        "client",
        "close_after",
        "conn",
        "done",
        "head",
        "local",
        "observer",
        "pending",
        "pending_size",
        "replay",
        "replay_size",
        "request_done",
        "responded",
        "started",
        "tried",
        "tries",
        "upstream",
        "user",
        "waiting",
    )

    def __init__(self, client: ClientConnection, head: RequestHead) -> None:
        self.client = client
        self.head = head
        self.upstream: Upstream | None = None
        self.conn: UpstreamConnection | None = None
        self.pending: list[bytes] = []  # bytes for the upstream not yet written
        self.pending_size = 0
        self.replay: list[bytes] | None = None  # the body so far, while it may be retried
        self.replay_size = 0
        self.started = 0.0  # the request complete and sent to a first upstream, the later
        self.request_done = False
        self.responded = False  # a response head went to the client
        self.done = False
        self.close_after = False
        self.tries = 0
        self.tried: set[Upstream] | None = None
        self.local: bytes | None = None  # a complete local answer (errors, filters)
        self.observer: BodyObserver | None = None
        self.user: dict[str, Any] | None = None  # free space for filters
        self.waiting = False  # a back-off or a filter's wait will dispatch it again

    @property
    def client_address(self) -> str:
        return self.client.ip

    def waive_response(self, head_lines: bytes = b"") -> None:
        """For a filter that reads answers: it need not read this one. `head_lines` (whole
        `Name: value\r\n` lines) go into the answer's head instead. When every such filter
        waives, the answer may take the fast path."""
        user = self.user
        if user is None:
            user = self.user = {}
        user[WAIVERS] = user.get(WAIVERS, 0) + 1
        user[EXTRA_HEAD] = user.get(EXTRA_HEAD, b"") + head_lines


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, dispatches exchanges in order."""

    __slots__ = (
        "active",
        "eof",
        "ex",
        "fwd_tail",
        "head_since",
        "ip",
        "last_head",
        "lb",
        "lingering",
        "parser",
        "queue",
        "quiet",
        "receiving",
        "seen",
        "transport",
        "tunnel",
        "tunnel_buf",
        "unsent",
        "unsent_since",
        "write_paused",
    )

    def __init__(self, lb: Proxy) -> None:
        self.lb = lb
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(self, **lb.config.limits)
        self.ip = ""
        self.fwd_tail = b""
        self.ex: Exchange | None = None  # the exchange being answered
        self.receiving: Exchange | None = None  # the exchange whose request is being read
        self.queue: deque[Exchange] | None = None  # pipelined requests waiting their turn
        self.active = True
        self.quiet = lb.now
        self.head_since = 0.0
        self.eof = False
        self.seen = 0  # requests parsed on this connection
        self.last_head: RequestHead | None = None
        self.lingering = False
        self.write_paused = False
        self.unsent = 0  # bytes the transport held at the last check
        self.unsent_since = 0.0  # since when the client has taken none of them
        self.tunnel: UpstreamConnection | None = None
        self.tunnel_buf: list[bytes] | None = None  # client bytes before the 101 arrives

    # --- asyncio callbacks ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.ip = ip = peer[0] if isinstance(peer, tuple) else "unix"
        self.fwd_tail = b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\n\r\n" % (
            ip.encode(),
            self.lb.scheme,
        )
        self.lb.clients.add(self)

    def data_received(self, data: bytes) -> None:
        self.active = True
        memo = self.lb.request_heads
        if (
            self.receiving is None
            and self.tunnel is None
            and self.tunnel_buf is None
            and not self.lingering
        ):
            head = memo.get(data)
            if head is not None and not self.parser.in_head:
                # these exact bytes were one whole body-less request before: on_request
                # and on_request_end, inlined (seen, last_head and head_since only matter
                # inside a parse)
                ex = Exchange(self, head)
                ex.request_done = True
                if self.ex is None:
                    self.ex = ex
                    self.dispatch(ex)
                    return
                self._enqueue(ex)
                self._after_feed()
                return
        if self.lingering:
            return
        if self.tunnel is not None:
            t = self.tunnel.transport
            if t is not None:
                t.write(data)
            return
        if self.tunnel_buf is not None:
            self.tunnel_buf.append(data)
            return
        parser = self.parser
        at_boundary = self.receiving is None and not parser.in_head
        seen = self.seen
        try:
            rest = parser.feed(data)
        except HTTPError as exc:
            self.bad_request(exc)  # answered after the requests before it
            rest = None
        except Exception as exc:  # a bug must not take the worker down
            self.lb.log(f"internal error on a client connection: {exc!r}")
            self.abort()
            return
        if (
            at_boundary
            and self.seen == seen + 1
            and self.receiving is None
            and rest is None
            and len(data) <= MEMO_HEAD_LIMIT
            and data.find(b"\r\n\r\n") == len(data) - 4
        ):
            last = self.last_head
            if last is not None and last.upgrade is None and not last.has_body:
                if len(memo) >= MEMO_SIZE:
                    memo.clear()
                memo[data] = last
        self._after_feed()
        if rest is not None:
            self.tunnel_buf = [rest] if rest else []

    def _after_feed(self) -> None:
        ex = self.ex
        if ex is not None:
            if ex.upstream is None and not ex.done and ex.local is None and not ex.waiting:
                self.dispatch(ex)
            elif ex.conn is not None and ex.pending:
                self._flush_pending(ex)

    def eof_received(self) -> bool | None:
        if self.lingering:
            return False
        if self.tunnel is not None:
            t = self.tunnel.transport
            if t is not None and t.can_write_eof():
                t.write_eof()
            return True
        if self.ex is not None:
            self.eof = True  # answer what was asked, then close
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lb.clients.discard(self)
        self.transport = None
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        ex = self.ex
        self.ex = None
        self.queue = None
        if ex is not None and not ex.done:
            ex.done = True
            if ex.observer is not None:
                ex.observer.abort()
            self.drop_try(ex, "client went away")

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.ex
        conn = self.tunnel or (ex.conn if ex is not None else None)
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.ex
        conn = self.tunnel or (ex.conn if ex is not None else None)
        if conn is not None and conn.transport is not None:
            conn.transport.resume_reading()

    # --- RequestParser callbacks ---
    def on_request(self, head: RequestHead) -> None:
        self.head_since = 0.0
        self.seen += 1
        self.last_head = head
        ex = Exchange(self, head)
        if head.has_body and is_retryable(head.method, head.headers):
            ex.replay = []  # kept up to REPLAY_LIMIT, so a failed try can be sent again
        self.receiving = ex
        if self.ex is None:
            self.ex = ex
        else:
            self._enqueue(ex)

    def _enqueue(self, ex: Exchange) -> None:
        """A pipelined request waits for the answers before it."""
        if self.queue is None:
            self.queue = deque()
        self.queue.append(ex)
        if len(self.queue) > 32 and self.transport is not None:
            self.transport.pause_reading()

    def on_body(self, data: bytes) -> None:
        ex = self.receiving
        if ex is None or ex.done:
            return
        if ex.head.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if ex.replay is not None:
            self._keep(ex, data)
        conn = ex.conn
        if conn is not None and not ex.pending:
            t = conn.transport
            if t is not None:
                t.write(data)
            return
        ex.pending.append(data)
        ex.pending_size += len(data)
        if ex.pending_size > PENDING_LIMIT and self.transport is not None:
            self.transport.pause_reading()  # resumed once an upstream takes the bytes

    def on_request_end(self) -> None:
        ex = self.receiving
        self.receiving = None
        if ex is None:
            return
        ex.request_done = True
        if ex.tries:  # sent before its body was all read: the deadline starts now
            ex.started = self.lb.now
        if ex.head.chunked and not ex.done:
            self.on_body_raw(ex, last_chunk(self.parser.trailers))

    def _keep(self, ex: Exchange, data: bytes) -> None:
        replay = ex.replay
        assert replay is not None
        replay.append(data)
        ex.replay_size += len(data)
        if ex.replay_size > REPLAY_LIMIT:
            ex.replay = None  # too long to keep: a try that sent it cannot be retried

    def on_body_raw(self, ex: Exchange, data: bytes) -> None:
        if ex.replay is not None:
            self._keep(ex, data)
        conn = ex.conn
        if conn is not None and not ex.pending and conn.transport is not None:
            conn.transport.write(data)
        else:
            ex.pending.append(data)

    # --- dispatching ---
    def dispatch(self, ex: Exchange, first_filter: int = 0) -> None:
        """Answer locally, or choose an upstream and send the request to it."""
        lb = self.lb
        filters = lb.filters
        if filters or ex.local is not None:
            if ex.local is not None:
                self.answer_local(ex)
                return
            for i in range(first_filter, len(filters)):
                answer = filters[i].on_request(ex)
                if answer is None:
                    continue
                if isinstance(answer, bytes):
                    ex.local = answer
                    self.answer_local(ex)
                else:  # the filter needs to wait (a coalesced cache fill): resume after
                    ex.upstream = None
                    ex.waiting = True
                    lb.spawn(self._resume(ex, answer, i + 1))
                return
            up = self.pick(ex)
        elif ex.tried is None:
            up = lb.policy.pick(ex.head, self.ip)
        else:
            up = self.pick(ex)
        if up is None:
            n = len(lb.upstreams)
            ready = sum(1 for u in lb.upstreams if u.available)
            self.fail(ex, 503, f"no upstream available ({n} configured, {ready} available)")
            return
        ex.upstream = up
        up.inflight += 1
        if not ex.tries:
            ex.started = lb.now
        ex.tries += 1
        pool = up.pool
        assert pool is not None
        idle = pool.idle  # pool.take(), inlined
        while idle:
            conn = idle.pop()
            t = conn.transport
            if t is not None and not t.is_closing():
                self.attach(ex, conn)
                return
        lb.spawn(self.connect(ex, up, pool))

    async def _resume(self, ex: Exchange, waiting: Awaitable[bytes | None], nxt: int) -> None:
        try:
            answer = await waiting
        except Exception as exc:
            self.lb.log(f"a filter failed: {exc!r}")
            answer = None
        ex.waiting = False
        if ex.done or self.transport is None or self.ex is not ex:
            return
        if answer is not None:
            ex.local = answer
            self.answer_local(ex)
        else:
            self.dispatch(ex, nxt)

    def pick(self, ex: Exchange) -> Upstream | None:
        lb = self.lb
        policy = lb.policy
        exclude = ex.tried
        up = policy.pick(ex.head, self.ip, exclude)
        if up is None and exclude:
            up = policy.pick(ex.head, self.ip)  # every one was tried: try again afresh
        if up is not None and lb.filters:
            refused: set[Upstream] = set(exclude or ())
            while up is not None and not all(f.admit(ex, up) for f in lb.filters):
                refused.add(up)
                up = policy.pick(ex.head, self.ip, refused)
        return up

    async def connect(self, ex: Exchange, up: Upstream, pool: ConnectionPool[Any]) -> None:
        try:
            conn: UpstreamConnection = await pool.connect()
        except TimeoutError:
            self.upstream_failed(
                ex, up, f"did not accept a connection within {pool.connect_timeout} s", True
            )
            return
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            self.upstream_failed(ex, up, f"could not be reached: {reason.lower()}", True)
            return
        if ex.done or ex.upstream is not up or self.transport is None:
            pool.put(conn, self.lb.now)
            return
        self.attach(ex, conn)

    def attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.conn = conn
        conn.ex = ex
        conn.active = True
        t = conn.transport
        assert t is not None
        head = self.request_head(ex)
        if ex.pending:
            t.write(b"".join([head, *ex.pending]))
            ex.pending.clear()
            if ex.pending_size > PENDING_LIMIT and self.transport is not None:
                self.transport.resume_reading()
            ex.pending_size = 0
        else:
            t.write(head)
        if self.write_paused:
            t.pause_reading()

    def _flush_pending(self, ex: Exchange) -> None:
        conn = ex.conn
        assert conn is not None and conn.transport is not None
        conn.transport.write(b"".join(ex.pending))
        ex.pending.clear()
        if ex.pending_size > PENDING_LIMIT and self.transport is not None:
            self.transport.resume_reading()
        ex.pending_size = 0

    def request_head(self, ex: Exchange) -> bytes:
        """The request head for the upstream: hop-by-hop headers out, X-Forwarded-* in."""
        head = ex.head
        prefix = head.forward_prefix
        if prefix is not None:
            return prefix + self.fwd_tail
        parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
        append = parts.append
        xff: bytes | None = None
        has_host = False
        named = head.connection
        for k, v in head.headers:
            lk = k.lower()
            if lk in HOP_BY_HOP or (named and lk in named):
                continue
            if lk == b"host":
                has_host = True
            elif lk == b"x-forwarded-for":
                xff = v if xff is None else xff + b", " + v
                continue
            elif lk == b"x-forwarded-proto":
                continue
            append(k)
            append(b": ")
            append(v)
            append(b"\r\n")
        if not has_host:
            up = ex.upstream
            append(b"Host: %b\r\n" % (up.name.encode() if up is not None else b""))
        if head.chunked:
            append(b"Transfer-Encoding: chunked\r\n")
        if head.upgrade is not None:
            append(b"Connection: upgrade\r\nUpgrade: %b\r\n" % head.upgrade)
        if xff is None:
            if has_host:  # the same for every client: keep it with the (shared) head
                head.forward_prefix = b"".join(parts)
            append(self.fwd_tail)
        else:
            append(
                b"X-Forwarded-For: %b, %b\r\nX-Forwarded-Proto: %b\r\n\r\n"
                % (xff, self.ip.encode(), self.lb.scheme)
            )
        return b"".join(parts)

    # --- ending exchanges ---
    def upstream_failed(
        self,
        ex: Exchange,
        up: Upstream,
        reason: str,
        nothing_sent: bool,
        status: int = 502,
        *,
        retry: bool = True,
    ) -> None:
        """A try failed before a complete answer: retry when safe (and `retry`), else
        answer `status`."""
        if ex.done or ex.upstream is not up:
            return
        self.lb.end_try(ex, None, reason)
        ex.conn = None
        if self.transport is None:
            return
        if not ex.responded:
            head = ex.head
            safe = nothing_sent or (  # idempotent, or marked retryable by the client
                retry
                and head.upgrade is None
                and (
                    ex.replay is not None
                    if head.has_body
                    else is_retryable(head.method, head.headers)
                )
            )
            lb = self.lb
            if safe and ex.tries < lb.config.tries and not lb.closing:
                # a try that never reached the upstream cost it nothing: only a request that
                # was sent is charged to the retry budget
                if nothing_sent or lb.retry_rate.allow(lb.now, lb.requests):
                    if nothing_sent:
                        lb.retry_rate.exempt()
                    if ex.tried is None:
                        ex.tried = set()
                    ex.tried.add(up)
                    if ex.replay is not None:  # the body read so far goes again, in order
                        ex.pending = list(ex.replay)
                        ex.pending_size = ex.replay_size
                    tried = ex.tried
                    if any(u.available and u not in tried for u in lb.upstreams):
                        self.redispatch(ex)  # another upstream is there: at once
                    else:  # each was tried: wait, so a restarting one has time to come back
                        delay = retry_backoff(ex.tries, random.random())
                        ex.waiting = True
                        asyncio.get_running_loop().call_later(delay, self._retry, ex)
                    return
                reason += " (not retried: the retry budget is spent)"
            self.fail(ex, status, f"upstream {up.name} {reason}")
        else:
            if ex.observer is not None:
                ex.observer.abort()
            ex.done = True
            self.abort()  # the answer is cut short: the client must see it

    def _retry(self, ex: Exchange) -> None:
        ex.waiting = False
        if not ex.done and self.transport is not None and self.ex is ex:
            self.redispatch(ex)

    def redispatch(self, ex: Exchange) -> None:
        """Send a retry: the filters' `on_request` ran for the first try (a rate limit
        charged it, the cache looked it up) and are not asked again."""
        self.dispatch(ex, len(self.lb.filters))

    def fail(self, ex: Exchange, status: int, detail: str) -> None:
        """Answer `status` with a one-line body naming what went wrong."""
        close = not (ex.head.keep_alive and ex.request_done) or self.lb.closing
        body = f"{self.lb.config.name}: {detail}\n".encode()
        ex.local = simple_response(status, body, close=close)
        if status >= 500:
            self.lb.report_failure(status, detail)
        ex.close_after = ex.close_after or close
        self.answer_local(ex)

    def answer_local(self, ex: Exchange) -> None:
        t = self.transport
        if t is None or ex.local is None:
            return
        t.write(ex.local)
        ex.responded = True
        if not ex.request_done or not ex.head.keep_alive:
            ex.close_after = True
        self.exchange_done(ex)

    def bad_request(self, exc: HTTPError) -> None:
        """A request we cannot parse: answer its status after the earlier ones, then close.
        An error inside a request's body ends that request: its try is cut off (the
        upstream must not wait for the rest) and it is answered with the error."""
        t = self.transport
        if t is None:
            return
        t.pause_reading()
        body = f"{self.lb.config.name}: {exc.detail}\n".encode()
        answer = simple_response(exc.status, body, close=True)
        cut = self.receiving
        self.receiving = None
        if cut is not None and not cut.done:
            self.cut_off(cut, answer)
            return
        ex = Exchange(self, _ERROR_HEAD)
        ex.local = answer
        ex.request_done = True
        ex.close_after = True
        if self.ex is None:
            self.ex = ex
            self.answer_local(ex)
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)

    def cut_off(self, ex: Exchange, answer: bytes) -> None:
        """End `ex`, whose request body was malformed: close its upstream connection
        (the try teaches nothing about the upstream), answer `answer` in its turn, or
        cut the client connection if an answer is already under way."""
        ex.replay = None
        ex.pending = []
        ex.local = answer  # set first: the filters see a try ended by a local answer
        self.drop_try(ex, "the request body was malformed")
        if ex.responded:
            if ex.observer is not None:
                ex.observer.abort()
            ex.done = True
            self.abort()
            return
        ex.request_done = True
        ex.close_after = True
        if self.ex is ex:
            self.answer_local(ex)
        # else it waits behind an earlier exchange, which dispatches it (answered locally)

    def exchange_done(self, ex: Exchange) -> None:
        ex.done = True
        if self.ex is ex:
            self.ex = None
        if not (self.queue or ex.close_after or self.eof or self.lb.closing):
            return  # the common case: nothing waits, the connection stays open
        t = self.transport
        if t is None:
            return
        if ex.close_after or ((self.eof or self.lb.closing) and not self.queue):
            self.linger()
            return
        q = self.queue
        if q:
            nxt = q.popleft()
            self.ex = nxt
            if len(q) <= 32:
                t.resume_reading()
            if nxt.upstream is None:
                self.dispatch(nxt)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def linger(self) -> None:
        """Close after the last answer without losing it: send FIN, read and drop what the
        client still sends (closing with unread bytes would reset the connection and could
        destroy the answer in flight), close when the client does or after a second."""
        t = self.transport
        if t is None:
            return
        self.queue = None
        self.ex = None
        if self.eof or not t.can_write_eof():
            t.close()
            return
        self.tunnel_buf = None
        self.lingering = True
        t.write_eof()
        t.resume_reading()
        asyncio.get_running_loop().call_later(1.0, t.close)

    # --- timeouts (called by the sweeper) ---
    def check(self, now: float, cfg: ProxyConfig) -> None:
        transport = self.transport
        if transport is not None:
            unsent = transport.get_write_buffer_size()
            if unsent != self.unsent:
                # nothing waited, the client took some, or more was written (how much
                # the client took then is unknown: a growing buffer is not a stall)
                self.unsent_since = now
            self.unsent = unsent
            if unsent and now - self.unsent_since > cfg.send_timeout:
                # it takes nothing of what it was sent: streaming (then writes are held
                # back and the buffer stops changing), idle, lingering or in a tunnel
                self.abort()
                return
        if self.lingering:
            return
        if self.active:
            self.active = False
            self.quiet = now
        idle = now - self.quiet
        if self.tunnel is not None:
            t = self.tunnel
            if t.active:
                t.active = False
                t.quiet = now
            if min(idle, now - t.quiet) > cfg.tunnel_timeout:
                self.abort()
            return
        ex = self.ex
        if ex is None:
            if self.parser.in_head:
                if not self.head_since:
                    self.head_since = now
                elif now - self.head_since > cfg.header_timeout:
                    self.bad_request(
                        HTTPError(408, f"request head not received within {cfg.header_timeout} s")
                    )
            elif idle > cfg.idle_timeout and self.transport is not None:
                self.transport.close()
            return
        if (
            cfg.request_timeout
            and ex.request_done
            and ex.tries
            and not ex.responded
            and now - ex.started > cfg.request_timeout
        ):
            tries = f"{ex.tries} tr{'y' if ex.tries == 1 else 'ies'}"
            self.fail_timeout(ex, 504, f"no answer within {cfg.request_timeout} s ({tries})")
            return
        if not ex.request_done and idle > cfg.body_timeout:
            if ex.responded or self.transport is None:
                self.abort()
            else:
                self.receiving = None
                ex.request_done = True  # stop waiting for it
                self.fail_timeout(ex, 408, f"request body stalled for {cfg.body_timeout} s")
            return
        conn = ex.conn
        if conn is not None:
            if conn.active:
                conn.active = False
                conn.quiet = now
            elif now - conn.quiet > cfg.upstream_timeout:
                up = ex.upstream
                assert up is not None
                conn.ex = None
                conn.close()
                self.upstream_failed(
                    ex, up, f"did not answer within {cfg.upstream_timeout} s", False, 504
                )

    def drop_try(self, ex: Exchange, reason: str) -> None:
        """End `ex`'s try in flight, if any: its upstream connection is closed (it is
        mid-exchange, so it cannot be reused) and the try counted as failed for `reason`."""
        conn = ex.conn
        if conn is not None:
            conn.ex = None
            conn.close()
            ex.conn = None
        if ex.upstream is not None:
            self.lb.end_try(ex, None, reason)

    def fail_timeout(self, ex: Exchange, status: int, detail: str) -> None:
        self.drop_try(ex, detail)
        ex.close_after = True
        self.fail(ex, status, detail)


class UpstreamConnection(PooledConnection):
    """One pooled connection to an upstream; parses its answers for the current exchange."""

    __slots__ = (
        "active",
        "ending",
        "ex",
        "lb",
        "out",
        "parser",
        "quiet",
        "rechunk",
        "remaining",
        "response",
        "status",
        "tunnel",
    )

    def __init__(self, lb: Proxy) -> None:
        super().__init__()
        self.remaining = 0  # body bytes still to pass through on the fast path
        self.status = 0
        self.lb = lb
        self.parser = ResponseParser(self)
        self.ex: Exchange | None = None
        self.out: list[bytes] = []
        self.rechunk = False
        self.ending = False
        self.response: ResponseHead | None = None
        self.active = True
        self.quiet = 0.0
        self.tunnel: ClientConnection | None = None

    def data_received(self, data: bytes) -> None:
        self.active = True
        if self.tunnel is not None:
            t = self.tunnel.transport
            if t is not None:
                t.write(data)
            return
        ex = self.ex
        if ex is None:  # nobody asked: an idle connection must stay silent
            pool = self.pool
            self.lb.surplus_answer(f"{pool.host}:{pool.port}" if pool else "?", len(data))
            self.close()
            return
        rem = self.remaining
        if rem:  # the fast path's body: counted, passed through untouched
            n = len(data)
            t = ex.client.transport
            if n < rem:
                self.remaining = rem - n
                if t is not None:
                    t.write(data)
                return
            self.remaining = 0
            if t is not None:
                t.write(data if n == rem else data[:rem])
            if n != rem:  # bytes after the end of the answer: never to any client
                self.lb.surplus_answer(ex.upstream.name if ex.upstream else "?", n - rem)
            self._done(ex, self.status, n == rem)
            return
        parser = self.parser
        if self.response is None and not parser.in_head:
            if self._fast(ex, data):
                return
            parser.expect(ex.head.method)
        try:
            rest = parser.feed(data)
        except HTTPError as exc:
            self.out.clear()
            self.ex = None
            self.close()
            up = ex.upstream
            if up is not None:  # it ran the request: not retried (see the module doc)
                reason = f"sent an invalid response: {exc.detail}"
                ex.client.upstream_failed(ex, up, reason, False, retry=False)
            return
        except Exception as exc:  # a bug must not take the worker down
            self.lb.log(f"internal error on an upstream connection: {exc!r}")
            self.ex = None
            self.close()
            ex.client.abort()
            return
        if self.out:
            self._flush(ex)
        if rest is not None:
            self._start_tunnel(ex, rest)
        elif self.ending:
            self._finish(ex)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            t = self.tunnel.transport
            if t is not None and t.can_write_eof():
                t.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.tunnel is not None:
            self.tunnel.abort()
            self.tunnel = None
            return
        ex = self.ex
        if ex is None:
            return
        head = self.response
        if head is not None and head.until_close and ex.responded and not self.ending:
            if self.rechunk:
                self.out.append(LAST_CHUNK)
            self.ending = True
            self._flush(ex)
            self._finish(ex)
            return
        self.ex = None
        up = ex.upstream
        if up is not None:
            reason = "closed the connection before answering"
            if ex.responded:
                reason = "closed the connection in the middle of its answer"
            elif isinstance(exc, ConnectionResetError):
                reason = "reset the connection before answering"
            ex.client.upstream_failed(ex, up, reason, False)

    def pause_writing(self) -> None:
        ex = self.ex
        client = self.tunnel or (ex.client if ex is not None else None)
        if client is not None and client.transport is not None:
            client.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.ex
        client = self.tunnel or (ex.client if ex is not None else None)
        if client is not None and client.transport is not None:
            client.transport.resume_reading()

    # --- ResponseParser callbacks ---
    def on_response(self, head: ResponseHead) -> None:
        ex = self.ex
        assert ex is not None
        status = head.status
        client_11 = ex.head.version == "1.1"
        if status < 200 and status != 101:
            if client_11:  # interim answer (100 Continue, 103 Early Hints): pass it on
                self.out.append(self._head_bytes(head, b""))
            return
        self.response = head
        self.ending = False
        ex.responded = True
        rechunk = False
        tail = b""
        client = ex.client
        keep = ex.head.keep_alive and not (client.eof and not client.queue)  # more to answer
        if status == 101:
            if ex.head.upgrade is None:
                keep = False
            else:
                tail = b"Connection: upgrade\r\nUpgrade: %b\r\n" % (
                    head.header(b"upgrade") or ex.head.upgrade
                )
        elif ex.head.upgrade is not None:
            keep = False  # the client may have sent tunnel bytes we cannot parse
        elif not head.no_body and (head.chunked or head.until_close):
            if client_11:
                rechunk = True
                tail = b"Transfer-Encoding: chunked\r\n"
            else:
                keep = False
        if self.lb.closing:
            keep = False
        if status != 101:
            if not keep:
                tail += b"Connection: close\r\n"
                ex.close_after = True
            elif not client_11:
                tail += b"Connection: keep-alive\r\n"
        self.rechunk = rechunk
        user = ex.user
        if user is not None and EXTRA_HEAD in user:
            tail += user[EXTRA_HEAD]
        if self.lb.response_filters:  # before the head is written: a filter may add headers
            for f in self.lb.response_filters:
                obs = f.on_response(ex, head)
                if obs is not None and ex.observer is None:
                    ex.observer = obs
        self.out.append(self._head_bytes(head, tail))

    def _head_bytes(self, head: ResponseHead, tail: bytes) -> bytes:
        parts = [b"HTTP/1.1 %d %b\r\n" % (head.status, head.reason)]
        append = parts.append
        named = head.connection
        for k, v in head.headers:
            lk = k.lower()
            if lk in HOP_BY_HOP or (named and lk in named):
                continue
            append(k)
            append(b": ")
            append(v)
            append(b"\r\n")
        append(tail)
        append(b"\r\n")
        return b"".join(parts)

    def on_body(self, data: bytes) -> None:
        ex = self.ex
        if ex is not None and ex.observer is not None:
            ex.observer.feed(data)
        if self.rechunk:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self.out.append(data)

    def on_response_end(self) -> None:
        if self.rechunk:
            self.out.append(last_chunk(self.parser.trailers))
        self.ending = True

    # --- helpers ---
    def _flush(self, ex: Exchange) -> None:
        out = self.out
        t = ex.client.transport
        if t is not None:
            t.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _fast(self, ex: Exchange, data: bytes) -> bool:
        """The common answer, passed through as is: a whole `HTTP/1.1` head with one
        Content-Length, no hop-by-hop header but `Connection: keep-alive`, to a keep-alive
        HTTP/1.1 client, with no filter to run. Anything else returns False and goes to
        the full parser (which also judges whether it is valid at all).

        The verdict on a head depends only on its bytes, so it is memoised: a hot
        resource answers with the same head (Date included) many times a second."""
        end = data.find(b"\r\n\r\n")
        if end < 12 or not ex.head.plain or ex.client.eof:
            return False
        lb = self.lb
        if lb.closing:
            return False
        extra = b""
        if lb.response_filters:  # unless every filter that reads answers waived this one
            user = ex.user
            if user is None or user.get(WAIVERS) != len(lb.response_filters):
                return False
            extra = user[EXTRA_HEAD]
        head = data[:end]
        memo = lb.fast_heads
        verdict = memo.get(head)
        if verdict is None:
            verdict = _judge_head(head)
            if len(memo) >= 512:
                memo.clear()
            memo[head] = verdict
        status, length = verdict
        if not status:
            return False
        if length >= 0:
            have = len(data) - end - 4
            if have > length:
                return False  # more than announced: let the full parser judge
        elif _chunked_end(data, end + 4) == len(data):
            have = length = 0  # a whole chunked answer in this read, in its plainest form
        else:
            return False
        ex.responded = True
        t = ex.client.transport
        if t is not None:
            if extra:  # the waivers' header lines, after the status line
                i = data.find(b"\r\n") + 2
                data = b"".join((data[:i], extra, data[i:]))
            t.write(data)
        if have == length:
            self._done(ex, status, True)
        else:
            self.status = status
            self.remaining = length - have
        return True

    def _finish(self, ex: Exchange) -> None:
        """The answer is complete: pool this connection (when reusable), free the client."""
        self.ending = False
        head = self.response
        self.response = None
        if ex.observer is not None:
            ex.observer.end()
        surplus = self.parser.surplus
        if surplus:
            self.lb.surplus_answer(ex.upstream.name if ex.upstream else "?", 0)
        reusable = (
            head is not None
            and head.keep_alive
            and not head.until_close
            and not surplus  # the parser stopped where the answer ended: out of step
            and ex.head.method != b"HEAD"  # the parser stopped at the head: out of step
            and ex.head.upgrade is None  # client bytes may have followed the head
        )
        self._done(ex, head.status if head is not None else 0, reusable)

    def _done(self, ex: Exchange, status: int, reusable: bool) -> None:
        self.ex = None
        lb = self.lb
        up = ex.upstream
        if up is not None:
            # lb.end_try and pool.put, inlined: this runs once per request
            ex.upstream = None
            up.inflight -= 1
            lb.requests += 1
            if lb.filters:
                for f in lb.filters:
                    f.on_done(ex, up, status or None, None)
            pool = up.pool
            if (
                reusable
                and ex.request_done
                and not lb.closing
                and up.available
                and pool is not None
                and len(pool.idle) < pool.max_idle
            ):
                self.idle_since = lb.now
                pool.idle.append(self)
            else:
                self.close()
        else:
            self.close()
        ex.conn = None
        ex.client.exchange_done(ex)

    def _start_tunnel(self, ex: Exchange, rest: bytes) -> None:
        """After a 101: splice the client and this connection together."""
        client = ex.client
        head = self.response
        self.ex = None
        self.response = None
        if head is None or head.status != 101 or ex.head.upgrade is None:
            self.close()
            client.abort()
            return
        if ex.upstream is not None:
            self.lb.end_try(ex, 101, None)
        ex.done = True
        client.ex = None
        ct = client.transport
        if ct is None:
            self.close()
            return
        if rest:
            ct.write(rest)
        self.tunnel = client
        client.tunnel = self
        buf = client.tunnel_buf or []
        client.tunnel_buf = None
        if buf and self.transport is not None:
            self.transport.write(b"".join(buf))
        self.pool = None  # a tunnel never goes back to the pool


_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _chunked_end(data: bytes, pos: int) -> int:
    """Where the chunked body that starts at `pos` ends, when all of it is in `data` in its
    plainest form (sizes in hex digits only, no extensions, no trailer fields); else -1.
    Anything else is left to the full parser."""
    n = len(data)
    while True:
        j = data.find(b"\r\n", pos, pos + 18)  # at most 16 hex digits
        if j <= pos:
            return -1
        size = data[pos:j]
        if size.translate(None, _HEX_DIGITS):
            return -1
        k = int(size, 16)
        pos = j + 2
        if k == 0:
            return pos + 2 if data[pos : pos + 2] == b"\r\n" else -1
        pos += k
        if pos + 2 > n or data[pos : pos + 2] != b"\r\n":
            return -1
        pos += 2


def _judge_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) when a response head (without its final CRLF CRLF) may be
    forwarded as is on the fast path, (status, -1) when it may with a chunked body (see
    `_chunked_end`), else (0, 0)."""
    no = (0, 0)
    if not head.startswith(b"HTTP/1.1 ") or head[12:13] != b" ":
        return no
    lh = head.lower()
    chunked = False
    i = lh.find(b"\r\ntransfer-encoding:")
    if i >= 0:  # one Transfer-Encoding field saying exactly chunked, and no Content-Length
        j = lh.find(b"\r\n", i + 2)
        if j < 0:
            j = len(lh)
        if (
            lh[i + 20 : j].strip(b" \t") != b"chunked"
            or lh.count(b"transfer-encoding") != 1
            or b"content-length" in lh
        ):
            return no
        chunked = True
    elif b"transfer-encoding" in lh:
        return no
    if (
        b"upgrade" in lh
        or b"\x00" in head
        or b"trailer" in lh
        or b"keep-alive:" in lh
        or b"proxy-connection" in lh
        or b"\r\nte:" in lh
        or b"\n " in head
        or b"\n\t" in head
        or not head.count(b"\n") == head.count(b"\r") == head.count(b"\r\n")
    ):
        return no
    end = len(head)
    i = lh.find(b"\r\nconnection:")
    if i >= 0:
        j = lh.find(b"\r\n", i + 2)
        if j < 0:
            j = end
        if lh[i + 14 : j].strip(b" \t") != b"keep-alive" or lh.find(b"\r\nconnection:", j) >= 0:
            return no
    code = head[9:12]
    if not code.isdigit():
        return no
    status = int(code)
    if status < 200 or status == 204 or status == 304:
        return no
    if chunked:
        return status, -1
    i = lh.find(b"\r\ncontent-length:")
    if i < 0:
        return no
    j = lh.find(b"\r\n", i + 2)
    if j < 0:
        j = end
    value = lh[i + 17 : j].strip(b" \t")
    if not value.isdigit() or len(value) > 15 or lh.find(b"\r\ncontent-length:", j) >= 0:
        return no
    return status, int(value)


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
