"""The NATS connection: requests and their replies, pulls, feeds, stream and consumer setup.

Connection: opening tries twice, `connect_timeout` 2 s each, then raises
`BackendUnavailable`; after that the client reconnects by itself, forever. An operation
waits up to `timeout` s (option or `?timeout=`, default 5) for its replies, then raises
`BackendUnavailable`. After a reconnect, requests safe to repeat (reads, writes carrying a
`Nats-Msg-Id`, acks, naks) are sent again; a keyless enqueue or a publish cut off by the
disconnect raises `BackendUnavailable` saying it may or may not have happened.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors

from podkit.aio import wait_for
from podkit.backends.base import BackendError, BackendUnavailable
from podkit.backends.nats.wire import (
    CONSUMER_NOT_FOUND,
    NS,
    STREAM_NAME_IN_USE,
    _ack_meta,
    _APIError,
    _name,
    _Raw,
    _status,
)
from podkit.backends.url import BackendURL

DEFAULT_PORT = 4222
CONNECT_TIMEOUT = 2.0  # per connect attempt at open
TIMEOUT = 5.0  # default for one operation
RECONNECT_WAIT = 0.25
GRACE = 1.0  # after a reconnect, how long a reply to a request sent before it may still come
NO_WAIT_IDLE = 1.0  # a no-wait pull silent this long is given up (stale server counts)
SCAN_HEARTBEAT = 0.25  # and of a scan's: one means the scan has seen all there is


class _Batch:
    """Replies awaited together; `done` resolves when all came or one call failed."""

    __slots__ = ("done", "left", "replies")

    def __init__(self, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.replies: list[Any] = [None] * n
        self.left = n
        self.done: asyncio.Future[None] = loop.create_future()
        if n == 0:
            self.done.set_result(None)

    def reply(self, index: int, msg: Any) -> None:
        if self.replies[index] is None:
            self.replies[index] = msg
            self.left -= 1
            if self.left == 0 and not self.done.done():
                self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


@dataclass(slots=True, eq=False)
class _Call:
    """One request in flight; `gen` is the connection generation it was sent in."""

    subject: str
    payload: bytes
    headers: dict[str, str] | None
    resend: bool
    gen: int
    batch: _Batch
    index: int


class _Slot:
    """An inbox subscription for pull requests (deliveries keep their stream subject, so
    each pull in flight needs an inbox of its own); reused once a request has ended."""

    __slots__ = ("inbox", "on", "sub")

    def __init__(self, inbox: str) -> None:
        self.inbox = inbox
        self.on: Callable[[Any], bool] | None = None  # False: the request is over
        self.sub: Any = None


Item = tuple[str, bytes, dict[str, str] | None, bool]  # subject, payload, headers, resend


class _Conn:
    """One NATS connection; replies to requests come to one wildcard inbox."""

    def __init__(self, url: BackendURL, nc: Any, timeout: float) -> None:
        self.url = url
        self.nc = nc
        self.timeout = timeout
        self.gen = 0  # bumped on every disconnect
        self.hooks: set[Callable[[], None]] = set()  # called on disconnect and reconnect
        self.closed = False
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._ids = itertools.count()
        self._calls: dict[str, _Call] = {}
        self._slots: list[_Slot] = []  # idle inboxes for pull requests

    @classmethod
    async def open(cls, url: BackendURL, timeout: float) -> _Conn:
        ref: list[_Conn] = []

        async def disconnected() -> None:
            if ref:
                ref[0]._disconnected()

        async def reconnected() -> None:
            if ref:
                await ref[0]._reconnected()

        seen: list[Exception] = []  # errors during the first connect, to name the cause

        async def quiet(exc: Exception) -> None:
            if not ref:
                seen.append(exc)

        options: dict[str, Any] = {
            "servers": [f"nats://{url.address(DEFAULT_PORT)}"],
            "connect_timeout": CONNECT_TIMEOUT,
            "allow_reconnect": False,
            "max_reconnect_attempts": 1,  # at open: two attempts, then NoServersError
            "reconnect_time_wait": RECONNECT_WAIT,
            "ping_interval": 10,
            "max_outstanding_pings": 3,
            "name": "podkit",
            "error_cb": quiet,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
        }
        if url.username is not None:
            options["user"] = url.username
            options["password"] = url.password or ""
        try:
            nc = await nats.connect(**options)
        except nats.errors.AuthorizationError:
            raise BackendError(
                f"{url.masked}: {url.address(DEFAULT_PORT)} refused the credentials"
            ) from None
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            why = _why(seen[-1] if seen else exc)
            raise url.unavailable(DEFAULT_PORT, CONNECT_TIMEOUT, why) from None
        nc.options["allow_reconnect"] = True  # from now on: reconnect by itself, forever
        nc.options["max_reconnect_attempts"] = -1
        conn = cls(url, nc, timeout)
        ref.append(conn)
        await nc.subscribe(conn._prefix + "*", cb=conn._dispatch)
        return conn

    def unavailable(self, why: object) -> BackendUnavailable:
        return self.url.unavailable(DEFAULT_PORT, self.timeout, why)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        closed = BackendError(f"{self.url.masked}: closed")
        for call in list(self._calls.values()):
            call.batch.fail(closed)
        self._poke()
        try:
            await self.nc.close()
        except Exception:
            pass

    # -------------------------------------------------------------- events

    def _poke(self) -> None:
        for hook in list(self.hooks):
            hook()

    def _disconnected(self) -> None:
        self.gen += 1
        self._poke()

    async def _reconnected(self) -> None:
        gen = self.gen
        for token, call in list(self._calls.items()):
            if call.gen < gen and call.resend:
                call.gen = gen
                try:
                    await self.nc.publish(
                        call.subject, call.payload, reply=self._prefix + token, headers=call.headers
                    )
                except nats.errors.Error:
                    pass
        asyncio.get_running_loop().call_later(GRACE, self._give_up, gen)
        self._poke()

    def _give_up(self, gen: int) -> None:
        """Fail requests that cannot be repeated, sent before generation `gen`, still unanswered."""
        for call in list(self._calls.values()):
            if call.gen < gen and not call.resend:
                call.batch.fail(
                    BackendUnavailable(
                        f"{self.url.masked}: connection to {self.url.address(DEFAULT_PORT)} "
                        f"lost before the reply to {call.subject}: it may or may not have happened"
                    )
                )

    async def _dispatch(self, msg: Any) -> None:
        call = self._calls.get(msg.subject[self._cut :])
        if call is not None:  # else: a late or repeated reply
            call.batch.reply(call.index, msg)

    # -------------------------------------------------------------- requests

    async def request_many(self, items: Sequence[Item]) -> list[Any]:
        """Send every request, then wait for all replies (503 "no responders" is retried)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        replies: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        while True:
            if self.closed:
                raise BackendError(f"{self.url.masked}: closed")
            batch = _Batch(len(todo), loop)
            tokens: list[str] = []
            try:
                for j, i in enumerate(todo):
                    subject, payload, headers, resend = items[i]
                    token = f"r{next(self._ids)}"
                    self._calls[token] = _Call(
                        subject, payload, headers, resend, self.gen, batch, j
                    )
                    tokens.append(token)
                    await self.nc.publish(
                        subject, payload, reply=self._prefix + token, headers=headers
                    )
                if not batch.done.done():
                    await wait_for(batch.done, max(0.001, deadline - loop.time()))
                batch.done.result()
            except TimeoutError:
                raise self.unavailable(f"no reply to {items[todo[0]][0]}") from None
            except nats.errors.Error as exc:
                raise self.unavailable(_why(exc)) from None
            finally:
                for token in tokens:
                    self._calls.pop(token, None)
            retry: list[int] = []
            for j, i in enumerate(todo):
                if _status(batch.replies[j]) == "503":
                    retry.append(i)
                else:
                    replies[i] = batch.replies[j]
            if not retry:
                return replies
            if loop.time() + 0.1 >= deadline:
                raise self.unavailable(f"JetStream did not answer {items[retry[0]][0]}")
            await asyncio.sleep(0.1)
            todo = retry

    async def request(
        self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None
    ) -> Any:
        (reply,) = await self.request_many([(subject, payload, headers, True)])
        return reply

    async def api(self, op: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """`$JS.API.<op>`; its response, or `_APIError` (503s are retried until the timeout)."""
        payload = json.dumps(body).encode() if body is not None else b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            data: dict[str, Any] = json.loads((await self.request(f"$JS.API.{op}", payload)).data)
            error = data.get("error")
            if error is None:
                return data
            if error.get("code") == 503 and loop.time() + 0.1 < deadline:
                await asyncio.sleep(0.1)
                continue
            raise _APIError(self.url.masked, op, error)

    async def publish_many(self, items: Sequence[Item]) -> list[int | _APIError]:
        """JetStream publishes: each one's stream sequence (the original one for a duplicate
        `Nats-Msg-Id`) or its error."""
        out: list[int | _APIError] = []
        for msg in await self.request_many(items):
            data = json.loads(msg.data)
            error = data.get("error")
            out.append(
                int(data["seq"]) if error is None else _APIError(self.url.masked, "publish", error)
            )
        return out

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None, *, resend: bool
    ) -> int:
        (result,) = await self.publish_many([(subject, payload, headers, resend)])
        if isinstance(result, _APIError):
            raise result
        return result

    async def get_many(
        self, stream: str, requests: Sequence[dict[str, Any] | str]
    ) -> list[_Raw | None]:
        """Direct gets: a subject (its last message) or a request body ({"seq": n}, ...)."""
        items: list[Item] = []
        for req in requests:
            if isinstance(req, str):
                items.append((f"$JS.API.DIRECT.GET.{stream}.{req}", b"", None, True))
            else:
                items.append((f"$JS.API.DIRECT.GET.{stream}", json.dumps(req).encode(), None, True))
        out: list[_Raw | None] = []
        for msg in await self.request_many(items):
            headers = msg.headers or {}
            status = headers.get("Status")
            if status == "404":
                out.append(None)
            elif status is not None:
                why = f"{status} {headers.get('Description', '')}".strip()
                raise BackendError(f"{self.url.masked}: direct get on {stream}: {why}")
            else:
                out.append(
                    _Raw(int(headers["Nats-Sequence"]), headers["Nats-Subject"], headers, msg.data)
                )
        return out

    async def last(self, stream: str, subject: str) -> _Raw | None:
        (raw,) = await self.get_many(stream, [subject])
        return raw

    async def purge(self, stream: str, filters: Sequence[str]) -> None:
        items: list[Item] = [
            (f"$JS.API.STREAM.PURGE.{stream}", json.dumps({"filter": f}).encode(), None, True)
            for f in filters
        ]
        for msg in await self.request_many(items):
            error = json.loads(msg.data).get("error")
            if error is not None:
                raise _APIError(self.url.masked, f"purge {stream}", error)

    async def seq_range(self, stream: str, start: int, limit: int) -> list[_Raw]:
        """Messages with sequence >= `start` (at most `limit`), by direct gets."""
        state = (await self.api(f"STREAM.INFO.{stream}"))["state"]
        first = max(start, int(state["first_seq"]), 1)
        last = min(int(state["last_seq"]), first + limit - 1)
        out: list[_Raw] = []
        for lo in range(first, last + 1, 256):
            seqs = range(lo, min(last, lo + 255) + 1)
            out += [r for r in await self.get_many(stream, [{"seq": s} for s in seqs]) if r]
        return out

    # -------------------------------------------------------------- consumers

    async def _slot(self) -> _Slot:
        if self._slots:
            return self._slots.pop()
        slot = _Slot(self.nc.new_inbox())
        nc = self.nc

        async def deliver(msg: Any) -> None:
            if slot.on is not None and slot.on(msg):
                return
            if msg.reply and msg.reply.startswith("$JS.ACK.") and _status(msg) is None:
                await nc.publish(msg.reply, b"-NAK")  # too late for its pull: hand it back

        slot.sub = await nc.subscribe(slot.inbox, cb=deliver)
        return slot

    def _retire(self, slot: _Slot) -> None:
        """Drop a slot whose request may still deliver: it naks what comes, then goes."""

        async def drop() -> None:
            try:
                await slot.sub.unsubscribe()
            except Exception:
                pass

        asyncio.get_running_loop().call_later(
            self.timeout + GRACE, lambda: asyncio.ensure_future(drop())
        )

    async def pull(
        self, stream: str, consumer: str, batch: int, expires: float | None = None
    ) -> tuple[list[Any], str | None]:
        """One pull request: no_wait, or waiting up to `expires` seconds; (messages, the
        status that ended it or None if it did not end cleanly)."""
        loop = asyncio.get_running_loop()
        got: list[Any] = []
        ended: list[str] = []
        done: asyncio.Future[None] = loop.create_future()

        def on(msg: Any) -> bool:
            if done.done():
                return False
            status = _status(msg)
            if status is None:
                got.append(msg)
                if len(got) >= batch:
                    ended.append("")
                    done.set_result(None)
            elif status != "100":
                ended.append(status)
                done.set_result(None)
            return True

        def stop() -> None:
            if not done.done():
                done.set_result(None)

        body: dict[str, Any] = {"batch": batch}
        if expires is None:
            body["no_wait"] = True
            idle = NO_WAIT_IDLE
        else:
            body["expires"] = max(1_000_000, int(expires * NS))
            idle = expires + GRACE
        slot = await self._slot()
        slot.on = on
        self.hooks.add(stop)
        try:
            await self.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                json.dumps(body).encode(),
                reply=slot.inbox,
            )
            seen = -1
            while not done.done() and len(got) > seen:  # give up after `idle` s without news
                seen = len(got)
                try:
                    await wait_for(asyncio.shield(done), idle)
                except TimeoutError:
                    pass
        except nats.errors.Error as exc:
            raise self.unavailable(_why(exc)) from None
        finally:
            slot.on = None
            self.hooks.discard(stop)
            if ended and len(self._slots) < 64:
                self._slots.append(slot)  # the request is over: nothing more can come
            else:
                self._retire(slot)
        return got, (ended[0] or None) if ended else None

    async def fetch(self, stream: str, consumer: str, max_items: int, wait: float) -> list[Any]:
        """Up to `max_items` messages: what is there now, else the first one to come within
        `wait` seconds and what is there right after it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        msgs, status = await self.pull(stream, consumer, max_items)
        while not msgs and not self.closed:
            left = deadline - loop.time()
            if left <= 0.001:
                break
            if status not in (None, "404", "408"):  # 503 (loading), 409 (limits): back off
                await asyncio.sleep(min(0.05, left))
                msgs, status = await self.pull(stream, consumer, max_items)
                continue
            msgs, status = await self.pull(stream, consumer, 1, expires=left)
            if msgs and max_items > 1:
                more, _ = await self.pull(stream, consumer, max_items - 1)
                msgs += more
        return msgs

    async def ack_all(self, replies: Sequence[str], body: bytes = b"+ACK") -> None:
        """Ack every delivery; the last one waits for its reply, which the server sends
        after it has processed the acks before it (one connection, one consumer: in order)."""
        while replies:
            gen = self.gen
            try:
                for reply in replies[:-1]:
                    await self.nc.publish(reply, body)
            except nats.errors.Error as exc:
                raise self.unavailable(_why(exc)) from None
            await self.request(replies[-1], body)
            if self.gen == gen:
                return
            # a disconnect came in between: acks before the last may be lost, send all again

    async def feed(self, stream: str, config: dict[str, Any], heartbeat: float) -> _Feed:
        feed = _Feed(self, stream, heartbeat)
        await feed.start(config)
        return feed

    async def scan_last(self, stream: str, filter_subject: str) -> list[_Raw]:
        """The last message of every subject matching `filter_subject`."""
        config = {"deliver_policy": "last_per_subject", "filter_subject": filter_subject}
        for _ in range(5):
            feed = await self.feed(stream, config, SCAN_HEARTBEAT)
            try:
                found: dict[str, _Raw] = {}
                left = feed.pending
                while left > 0:
                    got = await feed.next()
                    if got is None:
                        break
                    raw, left = got
                    if raw is None:  # idle: what was counted at the start is gone meanwhile
                        left = 0
                    else:
                        found[raw.subject] = raw
                else:
                    return list(found.values())
            finally:
                await feed.close()
        raise self.unavailable(f"scan of {stream} kept breaking off")


class _Feed:
    """An ephemeral push consumer (ack none, flow control, heartbeats) on its own inbox."""

    def __init__(self, conn: _Conn, stream: str, heartbeat: float) -> None:
        self.conn = conn
        self.stream = stream
        self.heartbeat = heartbeat
        self.pending = 0
        self._q: asyncio.Queue[Any] = asyncio.Queue()
        self._sub: Any = None
        self._name: str | None = None
        self._cseq = 0

    async def start(self, config: dict[str, Any]) -> None:
        nc = self.conn.nc
        inbox = nc.new_inbox()
        q = self._q

        async def on(msg: Any) -> None:
            q.put_nowait(msg)

        self.conn.hooks.add(self._poke)
        try:
            self._sub = await nc.subscribe(inbox, cb=on)
            body = {
                "stream_name": self.stream,
                "config": {
                    **config,
                    "deliver_subject": inbox,
                    "ack_policy": "none",
                    "flow_control": True,
                    "idle_heartbeat": int(self.heartbeat * NS),
                    "mem_storage": True,
                    "inactive_threshold": 5 * NS,
                    "replay_policy": "instant",
                },
            }
            info = await self.conn.api(f"CONSUMER.CREATE.{self.stream}", body)
        except BaseException:
            await self.close()
            raise
        self._name = info["name"]
        self.pending = int(info["num_pending"])

    def _poke(self) -> None:
        self._q.put_nowait(None)

    async def next(self) -> tuple[_Raw | None, int] | None:
        """The next message and how many remain; (None, 0) on an idle heartbeat; None
        when the feed broke (a gap, a disconnect, 3 heartbeats missed): start a new one."""
        nc = self.conn.nc
        while True:
            try:
                msg = await wait_for(self._q.get(), 3 * self.heartbeat)
            except TimeoutError:
                return None
            if msg is None:
                return None
            headers = msg.headers or {}
            if "Status" in headers:  # flow control or heartbeat: answer when reached
                reply = msg.reply or headers.get("Nats-Consumer-Stalled")
                if reply:
                    try:
                        await nc.publish(reply, b"")
                    except nats.errors.Error:
                        return None
                elif headers.get("Description") == "Idle Heartbeat":
                    return None, 0
                continue
            seq, _, cseq, _, pending = _ack_meta(msg.reply)
            if cseq != self._cseq + 1:
                return None
            self._cseq = cseq
            return _Raw(seq, msg.subject, headers, msg.data), pending

    async def close(self) -> None:
        self.conn.hooks.discard(self._poke)
        nc = self.conn.nc
        try:
            if self._sub is not None:
                await self._sub.unsubscribe()
            if self._name is not None:
                await nc.publish(f"$JS.API.CONSUMER.DELETE.{self.stream}.{self._name}", b"")
        except Exception:
            pass  # closed connection: the server drops the consumer after inactive_threshold
        self._sub = self._name = None


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _ensure_streams(conn: _Conn, *configs: dict[str, Any]) -> None:
    """Create each stream, or bring an existing one to this configuration."""

    async def one(config: dict[str, Any]) -> None:
        try:
            await conn.api(f"STREAM.CREATE.{config['name']}", config)
        except _APIError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            await conn.api(f"STREAM.UPDATE.{config['name']}", config)

    await asyncio.gather(*(one(c) for c in configs))


async def _ensure_consumer(conn: _Conn, stream: str, config: dict[str, Any]) -> dict[str, Any]:
    """Info of the durable consumer, created with `config` if it did not exist."""
    durable = config["durable_name"]
    try:
        return await conn.api(f"CONSUMER.INFO.{stream}.{durable}")
    except _APIError as exc:
        if exc.err_code != CONSUMER_NOT_FOUND:
            raise
    body = {"stream_name": stream, "config": config}
    try:
        return await conn.api(f"CONSUMER.DURABLE.CREATE.{stream}.{durable}", body)
    except _APIError:  # created meanwhile by another client with another start or ack_wait
        return await conn.api(f"CONSUMER.INFO.{stream}.{durable}")


def _options(url: BackendURL, options: dict[str, Any]) -> tuple[str, float]:
    prefix = _name(url.query.get("prefix", "podkit"))
    timeout = float(options.get("timeout") or url.query.get("timeout") or TIMEOUT)
    return prefix, timeout
