"""The client side of the engine: `ClientConnection` parses a client's requests, runs
the filters, picks an upstream, sends each request and answers in order, and enforces
the client's timeouts (`check`, called by the sweeper). Its states are named in
`podkit.net.proxy.states`; its decisions are functions of state elsewhere: which upstream
(`upstream.choose`), whether and when to retry (`retry`), which timeout is due
(`timeouts`)."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from podkit.net.http import HTTPError, RequestHead, RequestParser
from podkit.net.httpwrite import HOP_BY_HOP, chunk, last_chunk, request_line, simple_response
from podkit.net.pool import ConnectionPool
from podkit.net.proxy.exchange import (
    ERROR_HEAD,
    MEMO_HEAD_LIMIT,
    MEMO_SIZE,
    PENDING_LIMIT,
    REPLAY_LIMIT,
    Exchange,
)
from podkit.net.proxy.retry import is_retryable, may_retry, retry_wait
from podkit.net.proxy.states import State, state_of
from podkit.net.proxy.timeouts import Timing, Verdict, timeout_verdict
from podkit.net.proxy.upstream import Upstream, choose

if TYPE_CHECKING:
    from podkit.net.proxy.config import ProxyConfig
    from podkit.net.proxy.engine import Proxy
    from podkit.net.proxy.upstreamconn import UpstreamConnection


# verdicts that end the connection at once: nothing can be answered on it any more
_ABORTS = frozenset({Verdict.SEND_STALLED, Verdict.TUNNEL_IDLE, Verdict.BODY_STALLED_ANSWERED})


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
            data = chunk(data)
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
            up = choose(lb.policy, ex.head, self.ip, ex.tried, ex)
        elif ex.tried is None:
            up = lb.policy.pick(ex.head, self.ip)
        else:
            up = choose(lb.policy, ex.head, self.ip, ex.tried)
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
        parts = [request_line(head.method, head.target)]
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
            lb = self.lb
            if may_retry(
                ex.head,
                tries=ex.tries,
                max_tries=lb.config.tries,
                nothing_sent=nothing_sent,
                body_kept=ex.replay is not None,
                retry=retry,
                closing=lb.closing,
            ):
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
                    delay = retry_wait(lb.upstreams, ex.tried, ex.tries, random.random())
                    if not delay:
                        self.redispatch(ex)  # another upstream is there: at once
                    else:
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
        ex = Exchange(self, ERROR_HEAD)
        ex.local = answer
        ex.request_done = True
        ex.close_after = True
        if self.ex is None:
            self.ex = ex
            self.answer_local(ex)
        else:
            self._enqueue(ex)

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

    # --- state and timeouts (called by the sweeper) ---
    @property
    def state(self) -> State:
        ex = self.ex
        return state_of(
            closed=self.transport is None,
            lingering=self.lingering,
            tunnel=self.tunnel is not None,
            answering=ex is not None,
            in_head=self.parser.in_head,
            request_done=ex is not None and ex.request_done,
            responded=ex is not None and ex.responded,
        )

    def timing(self, now: float) -> Timing:
        """What the timeouts look at; activity seen since the last sweep dates from now."""
        t = self.transport
        if t is not None:
            unsent = t.get_write_buffer_size()
            if unsent != self.unsent:
                # nothing waited, the client took some, or more was written (how much
                # the client took then is unknown: a growing buffer is not a stall)
                self.unsent_since = now
            self.unsent = unsent
        if self.active:
            self.active = False
            self.quiet = now
        ex = self.ex
        peer = self.tunnel or (ex.conn if ex is not None else None)
        if peer is not None and peer.active:
            peer.active = False
            peer.quiet = now
        if ex is None and self.parser.in_head and not self.head_since:
            self.head_since = now
        timing = Timing(
            self.state,
            quiet=self.quiet,
            unsent=self.unsent,
            unsent_since=self.unsent_since,
            head_since=self.head_since,
            peer_quiet=None if peer is None else peer.quiet,
        )
        if ex is not None:
            timing.started = ex.started
            timing.tries = ex.tries
            timing.responded = ex.responded
        return timing

    def check(self, now: float, cfg: ProxyConfig) -> None:
        """Act on the timeout due now, if any (`timeouts.timeout_verdict`)."""
        verdict = timeout_verdict(self.timing(now), now, cfg)
        if verdict is Verdict.KEEP:
            return
        ex = self.ex
        if verdict is Verdict.IDLE_TIMEOUT:
            if self.transport is not None:
                self.transport.close()
        elif verdict is Verdict.HEAD_TIMEOUT:
            detail = f"request head not received within {cfg.header_timeout} s"
            self.bad_request(HTTPError(408, detail))
        elif verdict in _ABORTS or ex is None:
            self.abort()
        elif verdict is Verdict.REQUEST_TIMEOUT:
            tries = f"{ex.tries} tr{'y' if ex.tries == 1 else 'ies'}"
            self.fail_timeout(ex, 504, f"no answer within {cfg.request_timeout} s ({tries})")
        elif verdict is Verdict.BODY_STALLED:
            self.receiving = None
            ex.request_done = True  # stop waiting for it
            self.fail_timeout(ex, 408, f"request body stalled for {cfg.body_timeout} s")
        elif verdict is Verdict.UPSTREAM_TIMEOUT:
            conn, up = ex.conn, ex.upstream
            assert conn is not None and up is not None
            conn.ex = None
            conn.close()
            reason = f"did not answer within {cfg.upstream_timeout} s"
            self.upstream_failed(ex, up, reason, False, 504)

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
