"""The upstream side of the engine: `UpstreamConnection` sends a request, parses the
answer (one per request: surplus closes the connection) and passes it to the client,
through the fast path when the head allows (`_judge_head`, `_chunked_end`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from podkit.net.http import HTTPError, ResponseHead, ResponseParser
from podkit.net.httpwrite import LAST_CHUNK, chunk, last_chunk, status_line, write_forwarded
from podkit.net.pool import PooledConnection
from podkit.net.proxy.exchange import EXTRA_HEAD, WAIVERS, Exchange

if TYPE_CHECKING:
    from podkit.net.proxy.clientconn import ClientConnection
    from podkit.net.proxy.engine import Proxy


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
        parts = [status_line(head.status, head.reason)]
        write_forwarded(parts, head.headers, head.connection)
        parts.append(tail)
        parts.append(b"\r\n")
        return b"".join(parts)

    def on_body(self, data: bytes) -> None:
        ex = self.ex
        if ex is not None and ex.observer is not None:
            ex.observer.feed(data)
        self.out.append(chunk(data) if self.rechunk else data)

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
