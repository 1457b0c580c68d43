"""`nats://[user:pass@]host:port[/store]?prefix=P`: KV, Queue and Topic on NATS JetStream.

Written for nats-server 2.9 (no per-message TTL, no batch get, no multi-subject writes).
Streams are named `<P>_<kind>_<name>` with subjects under `podkit.<P>.<kind>.<name>`
(`prefix` defaults to `podkit`; names keep [A-Za-z0-9] and escape other bytes as `-XX`).
Everything uses FILE storage, one replica.

Connection: opening tries twice, `connect_timeout` 2 s each, then raises
`BackendUnavailable`; after that the client reconnects by itself, forever. An operation
waits up to `timeout` s (option or `?timeout=`, default 5) for its replies, then raises
`BackendUnavailable`. After a reconnect, requests safe to repeat (reads, writes carrying a
`Nats-Msg-Id`, acks, naks) are sent again; a keyless enqueue or a publish cut off by the
disconnect raises `BackendUnavailable` saying it may or may not have happened.

KV (stream `<P>_kv_<store>`, store = URL path or `default`): one subject per key, a token
per `/`-separated segment, so the whole segments of a prefix narrow the subject filter and
the rest is matched client-side. A revision is the stream sequence of the write
(store-wide, strictly increasing: a fencing token); a delete is a tombstone message
(`Podkit-Op: del`) with a revision of its own. A write is one publish expecting the key's
last sequence as just read (`Nats-Expected-Last-Subject-Sequence`, 0: none): create,
update and delete_if are compare-and-set, put and delete re-read after a conflict.
`Podkit-Created` carries the creating revision; a fresh `Nats-Msg-Id` makes a resent write
apply once. `history` (default 64) messages are kept per key: a watch from an old revision
misses revisions of a key superseded more than `history` times since.

Leases (stream `<P>_lease_<store>`; 2.9 has no per-key TTL): a record `<id>.L`
{deadline, ttl} on the injected clock, by default the wall clock, so the hosts' clocks
must agree (NTP) to well under a TTL; `<id>.A.<key>` notes each key attached. Reads treat
a key of a lease past its deadline (or gone) as absent. Clients with an open watch sweep
every 0.5 s (a read that meets an expired lease sweeps it at once): every attached key
still naming the lease gets a tombstone expecting its sequence (race-safe, watchers see a
delete), then the lease's records are purged. A leased write checks the lease before and
after; if it died meanwhile the write is deleted again and `LeaseExpired` raised.

Queue (stream `<P>_q_<name>`, work-queue retention, durable pull consumer `workers`):
id = stream sequence, attempts = delivery count (less early deliveries of a delayed item),
receipt = the delivery's `$JS.ACK` subject. The consumer's ack_wait is `visibility` (an
`open_queue` option, default 30 s; the server's own timeout, so it also covers a client
killed before it could NAK); any other
visibility, `extend` and `nack(delay=)` send `-NAK {"delay": d}`, which on 2.9 keeps the
delivery pending and ackable until then and redelivers it after: per-delivery deadlines
kept by the server, no client timers. The server does not check receipts, so a ledger
stream `<P>_qm_<name>` holds `m.<id>` (current delivery count, last error) for redelivered
or nacked items and `n.<id>` for nacked items awaiting their retry (counted as depth). The
receipt also carries the delivery's visibility deadline: an ack reads the ledger only for
receipts past it (or nacked by the same object); an ack racing the redelivery itself may
still complete the item. Dead-lettering (the `max_attempts`-th delivery nacked, or fetched
again after it expired) copies the item to `<P>_qd_<name>` with attempts and last error,
then terminates it. Idempotency keys are `Nats-Msg-Id` within the duplicate window =
`dedupe_window` (default 3600 s; a restarted server forgets keys of consumed items).
`delay` is a `Podkit-Not-Before` header: an item fetched early is naked until then.
in_flight counts a delivery whose visibility expired until it is fetched again. A no-wait
fetch silent for 1 s is abandoned (seen after a crash, when the server's counts are stale);
after a SIGKILL, nats-server 2.9 may have lost the last acks: those items come back.

Topic (stream `<P>_t_<name>`, limits retention): position = stream sequence; a group is a
durable pull consumer its members share, created at `start` (deliver all, new, or by start
sequence) with the first member's ack_wait; a member with another ack_wait sets its own per
delivery with a delayed NAK. `read` is direct gets by sequence, no consumer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import string
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors

from podkit.aio import retrieve, wait_for
from podkit.backends.base import (
    BackendError,
    BackendUnavailable,
    Entry,
    Event,
    LeaseExpired,
    Message,
    QueueStats,
    Record,
    StaleReceipt,
    StartAt,
)
from podkit.backends.url import BackendURL
from podkit.clock import Clock, WallClock

DEFAULT_PORT = 4222
CONNECT_TIMEOUT = 2.0  # per connect attempt at open
TIMEOUT = 5.0  # default for one operation
RECONNECT_WAIT = 0.25
GRACE = 1.0  # after a reconnect, how long a reply to a request sent before it may still come
NO_WAIT_IDLE = 1.0  # a no-wait pull silent this long is given up (stale server counts)
HISTORY = 64  # KV messages kept per key
SWEEP_EVERY = 0.5  # seconds between lease sweeps while a watch is open
HEARTBEAT = 1.0  # idle heartbeat of a watch's push consumer
SCAN_HEARTBEAT = 0.25  # and of a scan's: one means the scan has seen all there is
ACK_WAIT = 30.0  # default queue consumer ack_wait (open_queue's `visibility`)
DEDUPE = 120.0  # duplicate window of streams whose writes carry a random Nats-Msg-Id
CAS_TRIES = 100
NS = 1_000_000_000

EXPECT = "Nats-Expected-Last-Subject-Sequence"
MSG_ID = "Nats-Msg-Id"
OP, CREATED, LEASE = "Podkit-Op", "Podkit-Created", "Podkit-Lease"
NOT_BEFORE = "Podkit-Not-Before"
ID, ATTEMPTS, ERROR, ENQUEUED = "Podkit-Id", "Podkit-Attempts", "Podkit-Error", "Podkit-Enqueued"

WRONG_LAST_SEQUENCE = 10071  # JetStream err_code: expected last subject sequence differs
CONSUMER_NOT_FOUND = 10014
STREAM_NAME_IN_USE = 10058  # exists with another configuration

# ---------------------------------------------------------------------------- names

_ALNUM = frozenset(string.ascii_letters + string.digits)
_TOKEN = _ALNUM | {"_"}


def _escape(text: str, keep: frozenset[str]) -> str:
    """`text` with every character outside `keep` as `-XX` per UTF-8 byte; "" is `-`."""
    if not text:
        return "-"
    return "".join(
        c if c in keep else "".join(f"-{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in text
    )


def _unescape(token: str) -> str:
    if token == "-":
        return ""
    if "-" not in token:
        return token
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "-":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out += token[i].encode()
            i += 1
    return out.decode("utf-8", "surrogatepass")


def _name(text: str) -> str:
    """A stream or consumer name part: [A-Za-z0-9] and `-XX` escapes."""
    return _escape(text, _ALNUM)


def _key_tokens(key: str) -> str:
    """The subject tokens of a KV key: one per `/`-separated segment."""
    return ".".join(_escape(s, _TOKEN) for s in key.split("/"))


def _key_of(tokens: str) -> str:
    return "/".join(_unescape(t) for t in tokens.split("."))


# ---------------------------------------------------------------------------- messages


@dataclass(slots=True)
class _Raw:
    """A stored message: its stream sequence, subject, headers and data."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


def _status(msg: Any) -> str | None:
    headers = msg.headers
    return headers.get("Status") if headers else None


def _ack_meta(reply: str) -> tuple[int, int, int, int, int]:
    """(stream seq, delivery count, consumer seq, timestamp ns, pending) of a `$JS.ACK`
    subject (the 9-token form, or the 12-token form with domain and account hash)."""
    t = reply.split(".")
    i = 4 if len(t) == 9 else 6
    return int(t[i + 1]), int(t[i]), int(t[i + 2]), int(t[i + 3]), int(t[i + 4])


@dataclass(frozen=True, slots=True)
class _Receipt:
    """A queue receipt `<$JS.ACK subject> <deadline>`: the delivery's ack subject and a
    time (queue clock) before which it cannot have been delivered again."""

    reply: str
    seq: int
    dc: int
    deadline: float

    @classmethod
    def parse(cls, receipt: str) -> _Receipt | None:
        reply, _, deadline = receipt.partition(" ")
        if not reply.startswith("$JS.ACK."):
            return None
        try:
            seq, dc, *_ = _ack_meta(reply)
            return cls(reply, seq, dc, float(deadline or 0))
        except (IndexError, ValueError):
            return None


class _APIError(BackendError):
    """A JetStream API or publish error, with its `code` and `err_code`."""

    def __init__(self, url: str, what: str, error: dict[str, Any]) -> None:
        self.code = int(error.get("code", 0))
        self.err_code = int(error.get("err_code", 0))
        desc = error.get("description", error)
        super().__init__(f"{url}: JetStream {what}: {desc} (err_code {self.err_code})")


# ---------------------------------------------------------------------------- connection


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


def _stream_config(
    name: str,
    subject: str,
    *,
    retention: str = "limits",
    per_subject: int = -1,
    dedupe: float = DEDUPE,
    max_age: float = 0.0,
) -> dict[str, Any]:
    return {
        "name": name,
        "subjects": [subject],
        "retention": retention,
        "storage": "file",
        "num_replicas": 1,
        "discard": "old",
        "max_msgs": -1,
        "max_bytes": -1,
        "max_msg_size": -1,
        "max_consumers": -1,
        "max_msgs_per_subject": per_subject,
        "max_age": int(max_age * NS),
        "duplicate_window": int((min(dedupe, max_age) if max_age > 0 else dedupe) * NS),
        "allow_direct": True,
    }


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


def _nak(delay: float) -> bytes:
    return b"-NAK" if delay <= 0 else b'-NAK {"delay": %d}' % max(1, int(delay * NS))


# ---------------------------------------------------------------------------- KV


@dataclass(slots=True)
class _Lease:
    deadline: float
    ttl: float
    seq: int


class NatsKV:
    """The JetStream KV: one stream per store, leases in a second stream."""

    def __init__(self, conn: _Conn, url: BackendURL, prefix: str, store: str, clock: Clock) -> None:
        self.url = url.masked
        self._c = conn
        self._clock = clock
        self._stream = f"{prefix}_kv_{store}"
        self._root = f"podkit.{prefix}.kv.{store}"
        self._cut = len(self._root) + 1
        self._lstream = f"{prefix}_lease_{store}"
        self._lroot = f"podkit.{prefix}.lease.{store}"
        self._watchers = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._expiring: set[int] = set()

    # -------------------------------------------------------------- helpers

    def _subject(self, key: str) -> str:
        return f"{self._root}.{_key_tokens(key)}"

    def _key(self, subject: str) -> str:
        return _key_of(subject[self._cut :])

    def _filter(self, key: str, prefix: bool) -> str:
        if not prefix:
            return self._subject(key)
        whole = key.split("/")[:-1]  # segments the prefix fixes completely
        return f"{self._root}.{_key_tokens('/'.join(whole))}.>" if whole else f"{self._root}.>"

    def _lsubject(self, lease: int) -> str:
        return f"{self._lroot}.{lease}.L"

    async def _leases(self, leases: Iterable[int]) -> dict[int, _Lease | None]:
        ids = sorted(set(leases))
        raws = await self._c.get_many(self._lstream, [self._lsubject(i) for i in ids])
        out: dict[int, _Lease | None] = {}
        for lease, raw in zip(ids, raws, strict=True):
            if raw is None:
                out[lease] = None
            else:
                rec = json.loads(raw.data)
                out[lease] = _Lease(float(rec["deadline"]), float(rec["ttl"]), raw.seq)
        return out

    async def _lease(self, lease: int) -> _Lease | None:
        return (await self._leases([lease]))[lease]

    async def _entries(self, raws: Sequence[_Raw]) -> list[Entry]:
        """Live entries of these key messages: tombstones and keys of dead leases left out
        (a dead lease is swept, a key naming a vanished lease deleted, in the background)."""
        live = [r for r in raws if r.headers.get(OP) != "del"]
        held = {int(r.headers[LEASE]) for r in live if LEASE in r.headers}
        leases = await self._leases(held) if held else {}
        now = self._clock.now()
        out: list[Entry] = []
        for raw in live:
            key = self._key(raw.subject)
            lease = int(raw.headers[LEASE]) if LEASE in raw.headers else None
            if lease is not None:
                state = leases[lease]
                if state is None:
                    self._spawn(self._tombstone(key, raw.seq))
                    continue
                if state.deadline <= now:
                    if lease not in self._expiring:
                        self._expiring.add(lease)
                        self._spawn(self._expire(lease))
                    continue
            created = int(raw.headers.get(CREATED, raw.seq))
            out.append(Entry(key, raw.data, raw.seq, created, lease))
        return out

    async def _current(self, key: str) -> tuple[_Raw | None, Entry | None]:
        """The key's last message (its sequence is what a write must expect) and its entry."""
        raw = await self._c.last(self._stream, self._subject(key))
        if raw is None:
            return None, None
        entries = await self._entries([raw])
        return raw, (entries[0] if entries else None)

    async def _write(
        self,
        key: str,
        value: bytes,
        expect: int,
        msg_id: str,
        *,
        created: int | None = None,
        lease: int | None = None,
        delete: bool = False,
    ) -> int | None:
        """Publish if the key's last sequence is `expect`; the revision, or None if not."""
        headers = {EXPECT: str(expect), MSG_ID: msg_id}
        if created is not None:
            headers[CREATED] = str(created)
        if lease is not None:
            headers[LEASE] = str(lease)
        if delete:
            headers[OP] = "del"
        try:
            return await self._c.publish(self._subject(key), value, headers, resend=True)
        except _APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return None
            raise

    async def _tombstone(self, key: str, expect: int) -> None:
        await self._write(key, b"", expect, uuid.uuid4().hex, delete=True)

    async def _attach(self, lease: int, key: str) -> None:
        """Check the lease is alive and record that `key` is attached to it."""
        state = await self._lease(lease)
        if state is None or state.deadline <= self._clock.now():
            raise LeaseExpired(f"{self.url}: lease {lease} is not alive")
        subject = f"{self._lroot}.{lease}.A.{_key_tokens(key)}"
        await self._c.publish(subject, b"", resend=True)

    async def _confirm(self, lease: int, key: str, revision: int) -> None:
        """After a leased write: if the lease died meanwhile, delete the write and raise."""
        state = await self._lease(lease)
        if state is None or state.deadline <= self._clock.now():
            await self._tombstone(key, revision)
            raise LeaseExpired(f"{self.url}: lease {lease} expired during the write of {key!r}")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        retrieve(task)  # a failed background sweep is retried later

    # -------------------------------------------------------------- reads

    async def get(self, key: str) -> Entry | None:
        return (await self._current(key))[1]

    async def range(self, prefix: str) -> list[Entry]:
        raws = await self._c.scan_last(self._stream, self._filter(prefix, True))
        mine = [r for r in raws if self._key(r.subject).startswith(prefix)]
        return sorted(await self._entries(mine), key=lambda e: e.key)

    async def revision(self) -> int:
        info = await self._c.api(f"STREAM.INFO.{self._stream}")
        return int(info["state"]["last_seq"])

    # -------------------------------------------------------------- writes

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        if lease is not None:
            await self._attach(lease, key)
        msg_id = uuid.uuid4().hex
        for _ in range(CAS_TRIES):
            raw, entry = await self._current(key)
            created = entry.created if entry is not None else None
            expect = raw.seq if raw is not None else 0
            rev = await self._write(key, value, expect, msg_id, created=created, lease=lease)
            if rev is not None:
                if lease is not None:
                    await self._confirm(lease, key, rev)
                return rev
        raise BackendError(f"{self.url}: put {key!r} lost {CAS_TRIES} races in a row")

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int | None:
        msg_id = uuid.uuid4().hex
        attached = False
        for _ in range(CAS_TRIES):
            raw, entry = await self._current(key)
            if entry is not None:
                return None
            if lease is not None and not attached:
                await self._attach(lease, key)
                attached = True
            expect = raw.seq if raw is not None else 0
            rev = await self._write(key, value, expect, msg_id, lease=lease)
            if rev is not None:
                if lease is not None:
                    await self._confirm(lease, key, rev)
                return rev
        raise BackendError(f"{self.url}: create {key!r} lost {CAS_TRIES} races in a row")

    async def update(
        self, key: str, value: bytes, *, revision: int, lease: int | None = None
    ) -> int | None:
        _, entry = await self._current(key)
        if entry is None or entry.revision != revision:
            return None
        if lease is not None:
            await self._attach(lease, key)
        rev = await self._write(
            key, value, revision, uuid.uuid4().hex, created=entry.created, lease=lease
        )
        if rev is not None and lease is not None:
            await self._confirm(lease, key, rev)
        return rev

    async def delete(self, key: str) -> bool:
        msg_id = uuid.uuid4().hex
        for _ in range(CAS_TRIES):
            raw, entry = await self._current(key)
            if raw is None or entry is None:
                return False
            if await self._write(key, b"", raw.seq, msg_id, delete=True) is not None:
                return True
        raise BackendError(f"{self.url}: delete {key!r} lost {CAS_TRIES} races in a row")

    async def delete_if(self, key: str, *, revision: int) -> bool:
        _, entry = await self._current(key)
        if entry is None or entry.revision != revision:
            return False
        return await self._write(key, b"", revision, uuid.uuid4().hex, delete=True) is not None

    # -------------------------------------------------------------- leases

    async def grant(self, ttl: float) -> int:
        record = json.dumps({"deadline": self._clock.now() + ttl, "ttl": ttl}).encode()
        while True:
            lease = secrets.randbits(53) + 1
            headers = {EXPECT: "0", MSG_ID: uuid.uuid4().hex}
            try:
                await self._c.publish(self._lsubject(lease), record, headers, resend=True)
                return lease
            except _APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:  # else: the id is taken, draw again
                    raise

    async def keep_alive(self, lease: int) -> bool:
        for _ in range(CAS_TRIES):
            state = await self._lease(lease)
            now = self._clock.now()
            if state is None or state.deadline <= now:
                return False
            record = json.dumps({"deadline": now + state.ttl, "ttl": state.ttl}).encode()
            headers = {EXPECT: str(state.seq), MSG_ID: uuid.uuid4().hex}
            try:
                await self._c.publish(self._lsubject(lease), record, headers, resend=True)
                return True
            except _APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
        raise BackendError(f"{self.url}: keep_alive of lease {lease} lost {CAS_TRIES} races")

    async def revoke(self, lease: int) -> None:
        state = await self._lease(lease)
        if state is not None:  # first mark it dead, so writers racing the revoke see it
            record = json.dumps({"deadline": 0, "ttl": state.ttl}).encode()
            await self._c.publish(
                self._lsubject(lease), record, {MSG_ID: uuid.uuid4().hex}, resend=True
            )
        await self._expire(lease)

    async def _expire(self, lease: int) -> None:
        """Delete the keys still attached to a dead lease, then forget the lease."""
        try:
            attached = await self._c.scan_last(self._lstream, f"{self._lroot}.{lease}.A.>")
            cut = len(f"{self._lroot}.{lease}.A.")
            keys = [_key_of(r.subject[cut:]) for r in attached]
            raws = await self._c.get_many(self._stream, [self._subject(k) for k in keys])
            doomed: list[Item] = []
            for key, raw in zip(keys, raws, strict=True):
                if raw is not None and raw.headers.get(LEASE) == str(lease):  # still its key
                    headers = {EXPECT: str(raw.seq), MSG_ID: uuid.uuid4().hex, OP: "del"}
                    doomed.append((self._subject(key), b"", headers, True))
            await self._c.publish_many(doomed)  # a conflict means someone rewrote the key
            await self._c.purge(self._lstream, [f"{self._lroot}.{lease}.>"])
        finally:
            self._expiring.discard(lease)

    async def _sweep(self) -> float | None:
        """Expire the leases past their deadline; return the next live deadline, if any."""
        now = self._clock.now()
        upcoming: float | None = None
        for raw in await self._c.scan_last(self._lstream, f"{self._lroot}.*.L"):
            deadline = float(json.loads(raw.data)["deadline"])
            if deadline <= now:
                await self._expire(int(raw.subject.split(".")[-2]))
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
        return upcoming

    async def _sweep_loop(self) -> None:
        """Sweep at the next lease deadline (just after it), and at least every SWEEP_EVERY."""
        while self._watchers > 0 and not self._c.closed:
            pause = SWEEP_EVERY
            try:
                upcoming = await self._sweep()
                if upcoming is not None:
                    pause = min(pause, max(0.005, upcoming - self._clock.now() + 0.005))
            except Exception:  # server away, or a malformed record: try again next round
                pass
            await asyncio.sleep(pause)

    # -------------------------------------------------------------- watch

    async def _feed(self, filter_subject: str, start: int) -> _Feed:
        """A feed from sequence `start`, retried until it starts (or the client closes)."""
        config = {
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": start,
            "filter_subject": filter_subject,
        }
        pause = 0.1
        while True:
            if self._c.closed:
                raise BackendError(f"{self.url}: closed")
            try:
                return await self._c.feed(self._stream, config, HEARTBEAT)
            except BackendError:
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)

    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncIterator[Event]:
        if start_revision is None:
            start_revision = await self.revision() + 1
        nxt = max(1, start_revision)
        filter_subject = self._filter(key, prefix)
        self._watchers += 1
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        feed: _Feed | None = None
        try:
            while True:
                if feed is None:
                    feed = await self._feed(filter_subject, nxt)
                got = await feed.next()
                if got is None:  # broke off: resume from the next revision not yet seen
                    await feed.close()
                    feed = None
                    continue
                raw = got[0]
                if raw is None:  # idle
                    continue
                if raw.seq < nxt:
                    continue
                nxt = raw.seq + 1
                name = self._key(raw.subject)
                if name == key or (prefix and name.startswith(key)):
                    if raw.headers.get(OP) == "del":
                        yield Event("delete", name, None, raw.seq)
                    else:
                        yield Event("put", name, raw.data, raw.seq)
        finally:
            self._watchers -= 1
            if feed is not None:
                await feed.close()

    async def close(self) -> None:
        for task in [self._sweeper, *self._tasks]:
            if task is not None:
                task.cancel()
        await self._c.close()


# ---------------------------------------------------------------------------- Queue


def _stale(record: dict[str, Any] | None, dc: int) -> bool:
    """Whether delivery `dc` was superseded by a later delivery or nacked, per the ledger."""
    if record is None:
        return False
    return int(record["dc"]) > dc or (int(record["dc"]) == dc and bool(record.get("nacked")))


class NatsQueue:
    """The JetStream queue: a work-queue stream, one durable pull consumer, a ledger and a
    dead-letter stream."""

    def __init__(
        self,
        conn: _Conn,
        url: BackendURL,
        name: str,
        prefix: str,
        clock: Clock,
        max_attempts: int,
    ) -> None:
        self.url = url.masked
        self.name = name
        self.max_attempts = max_attempts
        self.dequeue_acks = False  # an ack and a pull are separate requests
        self._c = conn
        self._clock = clock
        self._ack_wait = ACK_WAIT  # the consumer's ack_wait: a visibility needing no NAK
        n = _name(name)
        self._stream, self._subject = f"{prefix}_q_{n}", f"podkit.{prefix}.q.{n}"
        self._ledger, self._lroot = f"{prefix}_qm_{n}", f"podkit.{prefix}.qm.{n}"
        self._dead, self._dsubject = f"{prefix}_qd_{n}", f"podkit.{prefix}.qd.{n}"
        self._consumer = "workers"
        self._nacked: dict[str, None] = {}  # replies of deliveries nacked here (bounded)

    def _record_item(self, seq: int, record: dict[str, Any]) -> Item:
        return (f"{self._lroot}.m.{seq}", json.dumps(record).encode(), None, True)

    def _waiting_item(self, seq: int) -> Item:
        return (f"{self._lroot}.n.{seq}", b"", None, True)

    def _forget_item(self, seq: int) -> str:
        return f"{self._lroot}.*.{seq}"

    async def _records(self, seqs: Iterable[int]) -> dict[int, dict[str, Any]]:
        ids = sorted(set(seqs))
        raws = await self._c.get_many(self._ledger, [f"{self._lroot}.m.{s}" for s in ids])
        return {s: json.loads(r.data) for s, r in zip(ids, raws, strict=True) if r is not None}

    # -------------------------------------------------------------- enqueue

    async def enqueue(self, payload: bytes, *, key: str | None = None, delay: float = 0) -> str:
        return (await self._enqueue([payload], [key], delay))[0]

    async def enqueue_batch(
        self, payloads: Sequence[bytes], *, keys: Sequence[str | None] | None = None
    ) -> list[str]:
        return await self._enqueue(payloads, keys or [None] * len(payloads), 0)

    async def _enqueue(
        self, payloads: Sequence[bytes], keys: Sequence[str | None], delay: float
    ) -> list[str]:
        not_before = str(self._clock.now() + delay) if delay > 0 else None
        items: list[Item] = []
        for payload, key in zip(payloads, keys, strict=True):
            headers: dict[str, str] | None = None
            if key is not None or not_before is not None:
                headers = {}
                if key is not None:
                    headers[MSG_ID] = key
                if not_before is not None:
                    headers[NOT_BEFORE] = not_before
            items.append((self._subject, bytes(payload), headers, key is not None))
        out: list[str] = []
        for result in await self._c.publish_many(items):
            if isinstance(result, _APIError):
                raise result
            out.append(str(result))
        return out

    # -------------------------------------------------------------- dequeue

    async def dequeue(
        self,
        max_items: int = 1,
        *,
        visibility: float = 30.0,
        wait: float = 0.0,
        ack: Sequence[Message] = (),
    ) -> list[Message]:
        if not ack:
            return await self._take(max_items, visibility, wait)
        # A JetStream ack and a pull are separate requests: send them side by side.
        acking = asyncio.ensure_future(self.ack(ack))
        try:
            out = await self._take(max_items, visibility, wait)
        except BaseException:
            acking.add_done_callback(retrieve)
            raise
        await acking  # if it failed, the items just taken come back after their visibility
        return out

    async def _take(self, max_items: int, visibility: float, wait: float) -> list[Message]:
        if max_items < 1:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            left = max(0.0, deadline - loop.time())
            hidden_until = self._clock.now() + visibility  # no earlier than the server's
            msgs = await self._c.fetch(self._stream, self._consumer, max_items, left)
            out = await self._accept(msgs, visibility, f" {hidden_until!r}")
            if out or not msgs or loop.time() >= deadline:
                return out

    async def _accept(self, msgs: list[Any], visibility: float, until: str) -> list[Message]:
        """Turn deliveries into Messages: record redeliveries, set visibility, and hold
        back items delivered before their time or after their last attempt."""
        metas = [_ack_meta(m.reply) for m in msgs]
        again = [seq for seq, dc, *_ in metas if dc > 1]
        records = await self._records(again) if again else {}
        now = self._clock.now()
        out: list[Message] = []
        writes: list[Item] = []
        forget: list[str] = []
        naks: list[Item] = []
        dead: list[tuple[Any, int, int, str | None, float]] = []
        for msg, (seq, dc, _, ts, _) in zip(msgs, metas, strict=True):
            record = records.get(seq, {})
            skip, error = int(record.get("skip", 0)), record.get("err")
            not_before = msg.headers.get(NOT_BEFORE) if msg.headers else None
            if not_before is not None and float(not_before) > now + 0.001:  # early: not an attempt
                rec = {"dc": dc, "skip": skip + 1, "err": error, "nacked": True}
                writes += [self._record_item(seq, rec), self._waiting_item(seq)]
                naks.append((msg.reply, _nak(float(not_before) - now), None, True))
                continue
            attempts = dc - skip
            if attempts > self.max_attempts:  # its last visibility expired: dead
                dead.append((msg, seq, attempts - 1, error, ts / NS))
                continue
            if dc > 1:
                writes.append(self._record_item(seq, {"dc": dc, "skip": skip, "err": error}))
                if record.get("nacked"):
                    forget.append(f"{self._lroot}.n.{seq}")
            if visibility != self._ack_wait:
                naks.append((msg.reply, _nak(visibility), None, True))
            receipt = msg.reply + until
            out.append(Message(str(seq), msg.data, attempts, receipt, ts / NS, error))
        if writes:
            for result in await self._c.publish_many(writes):
                if isinstance(result, _APIError):
                    raise result
        if forget:
            await self._c.purge(self._ledger, forget)
        if naks:
            await self._c.request_many(naks)
        for msg, seq, attempts, error, enqueued in dead:
            why = error if error is not None else "visibility timeout expired"
            await self._bury(seq, msg.data, attempts, why, enqueued, msg.reply)
        return out

    async def _bury(
        self,
        seq: int,
        payload: bytes,
        attempts: int,
        error: str | None,
        enqueued: float,
        reply: str,
    ) -> None:
        """Dead-letter: copy to the DLQ (once, by Nats-Msg-Id), terminate, drop the ledger."""
        headers = {
            MSG_ID: f"dead-{seq}",
            ID: str(seq),
            ATTEMPTS: str(attempts),
            ENQUEUED: repr(enqueued),
        }
        if error is not None:
            headers[ERROR] = json.dumps(error)  # one ASCII line, whatever the error text
        await self._c.publish(self._dsubject, payload, headers, resend=True)
        await self._c.request(reply, b"+TERM")
        await self._c.purge(self._ledger, [self._forget_item(seq)])

    # -------------------------------------------------------------- ack, nack, extend

    async def ack(self, messages: Sequence[Message]) -> None:
        deliveries = [r for m in messages if (r := _Receipt.parse(m.receipt)) is not None]
        if not deliveries:
            return
        # A delivery still within its visibility cannot have been delivered again, unless
        # nacked (here: remembered; elsewhere: a misuse); others are checked in the ledger.
        now = self._clock.now()
        doubtful = [r for r in deliveries if r.deadline <= now or r.reply in self._nacked]
        records: dict[int, dict[str, Any]] = {}
        if doubtful:
            busy = await self._c.get_many(
                self._ledger, [{"seq": 1, "next_by_subj": f"{self._lroot}.m.*"}]
            )
            if busy[0] is not None:
                records = await self._records(r.seq for r in doubtful)
        current = [r for r in deliveries if not _stale(records.get(r.seq), r.dc)]
        await self._c.ack_all([r.reply for r in current])
        done = sorted({r.seq for r in current if r.dc > 1 or r.seq in records})
        if done:
            await self._c.purge(self._ledger, [self._forget_item(s) for s in done])

    async def _check(self, message: Message) -> tuple[_Receipt, dict[str, Any]]:
        """The receipt and ledger record of a current delivery; else StaleReceipt."""
        receipt = _Receipt.parse(message.receipt)
        if receipt is not None:
            items, records = await asyncio.gather(
                self._c.get_many(self._stream, [{"seq": receipt.seq}]),
                self._records([receipt.seq]),
            )
            rec = records.get(receipt.seq)
            if items[0] is not None and not _stale(rec, receipt.dc):
                return receipt, rec or {}
        raise StaleReceipt(f"{self.url}: {message.id} was re-delivered or already done")

    async def nack(self, message: Message, *, delay: float = 0, error: str | None = None) -> None:
        receipt, record = await self._check(message)
        seq, skip = receipt.seq, int(record.get("skip", 0))
        self._nacked[receipt.reply] = None
        while len(self._nacked) > 10_000:
            del self._nacked[next(iter(self._nacked))]
        if receipt.dc - skip >= self.max_attempts:
            attempts = receipt.dc - skip
            await self._bury(
                seq, message.payload, attempts, error, message.enqueued_at, receipt.reply
            )
            return
        rec = {"dc": receipt.dc, "skip": skip, "err": error, "nacked": True}
        for result in await self._c.publish_many(
            [self._record_item(seq, rec), self._waiting_item(seq)]
        ):
            if isinstance(result, _APIError):
                raise result
        await self._c.request(receipt.reply, _nak(delay))

    async def extend(self, message: Message, visibility: float) -> None:
        receipt, _ = await self._check(message)
        await self._c.request(receipt.reply, _nak(visibility))

    # -------------------------------------------------------------- inspection

    async def stats(self) -> QueueStats:
        consumer, ledger, dead = await asyncio.gather(
            self._c.api(f"CONSUMER.INFO.{self._stream}.{self._consumer}"),
            self._c.api(f"STREAM.INFO.{self._ledger}", {"subjects_filter": f"{self._lroot}.n.*"}),
            self._c.api(f"STREAM.INFO.{self._dead}"),
        )
        waiting = len(ledger["state"].get("subjects") or {})
        pending = int(consumer["num_ack_pending"])
        return QueueStats(
            int(consumer["num_pending"]) + waiting,
            max(0, pending - waiting),
            int(dead["state"]["messages"]),
        )

    async def dead_letters(self, limit: int = 100) -> list[Message]:
        out: list[Message] = []
        for raw in await self._c.seq_range(self._dead, 1, limit):
            h = raw.headers
            error = json.loads(h[ERROR]) if ERROR in h else None
            out.append(Message(h[ID], raw.data, int(h[ATTEMPTS]), "", float(h[ENQUEUED]), error))
        return out

    async def close(self) -> None:
        await self._c.close()


# ---------------------------------------------------------------------------- Topic


class NatsSubscription:
    """A member of a group: pulls from the group's durable consumer."""

    def __init__(
        self, topic: NatsTopic, group: str, durable: str, ack_wait: float, own: float
    ) -> None:
        self.group = group
        self._t = topic
        self._durable = durable
        self._ack_wait = ack_wait
        self._own = own  # the consumer's ack_wait
        self._replies: dict[int, str] = {}  # position -> reply subject of its latest delivery

    async def fetch(self, max_items: int = 100, *, wait: float = 1.0) -> list[Record]:
        if max_items < 1:
            return []
        c = self._t._c
        msgs = await c.fetch(self._t._stream, self._durable, max_items, wait)
        out: list[Record] = []
        for msg in msgs:
            seq = _ack_meta(msg.reply)[0]
            self._replies[seq] = msg.reply
            out.append(Record(seq, msg.data))
        if msgs and self._ack_wait != self._own:
            await c.request_many([(m.reply, _nak(self._ack_wait), None, True) for m in msgs])
        return out

    async def ack(self, records: Sequence[Record]) -> None:
        replies = [r for rec in records if (r := self._replies.pop(rec.position, None))]
        await self._t._c.ack_all(replies)

    async def close(self) -> None:
        self._replies.clear()


class NatsTopic:
    """The JetStream topic: a limits-retention stream; groups are durable pull consumers."""

    def __init__(self, conn: _Conn, url: BackendURL, name: str, prefix: str) -> None:
        self.url = url.masked
        self.name = name
        self._c = conn
        n = _name(name)
        self._stream, self._subject = f"{prefix}_t_{n}", f"podkit.{prefix}.t.{n}"

    async def publish(self, payload: bytes) -> int:
        return (await self.publish_batch([payload]))[0]

    async def publish_batch(self, payloads: Sequence[bytes]) -> list[int]:
        out: list[int] = []
        items: list[Item] = [(self._subject, bytes(p), None, False) for p in payloads]
        for result in await self._c.publish_many(items):
            if isinstance(result, _APIError):
                raise result
            out.append(result)
        return out

    async def subscribe(
        self, group: str, *, start: StartAt = "earliest", ack_wait: float = 30.0
    ) -> NatsSubscription:
        config: dict[str, Any] = {
            "durable_name": _name(group),
            "ack_policy": "explicit",
            "ack_wait": int(ack_wait * NS),
            "max_deliver": -1,
            "max_ack_pending": -1,
            "replay_policy": "instant",
        }
        if start == "earliest":
            config["deliver_policy"] = "all"
        elif start == "latest":
            config["deliver_policy"] = "new"
        else:
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = max(1, int(start))
        info = await _ensure_consumer(self._c, self._stream, config)
        own = int(info["config"]["ack_wait"]) / NS
        return NatsSubscription(self, group, _name(group), ack_wait, own)

    async def read(self, start: int, limit: int = 100) -> list[Record]:
        if limit < 1:
            return []
        return [Record(r.seq, r.data) for r in await self._c.seq_range(self._stream, start, limit)]

    async def close(self) -> None:
        await self._c.close()


# ---------------------------------------------------------------------------- opening


def _options(url: BackendURL, options: dict[str, Any]) -> tuple[str, float]:
    prefix = _name(url.query.get("prefix", "podkit"))
    timeout = float(options.get("timeout") or url.query.get("timeout") or TIMEOUT)
    return prefix, timeout


async def open_kv(url: BackendURL, *, clock: Clock | None = None, **options: Any) -> NatsKV:
    prefix, timeout = _options(url, options)
    store = _name(url.path.strip("/") or "default")
    history = int(options.get("history") or url.query.get("history") or HISTORY)
    conn = await _Conn.open(url, timeout)
    try:
        await _ensure_streams(
            conn,
            _stream_config(
                f"{prefix}_kv_{store}", f"podkit.{prefix}.kv.{store}.>", per_subject=history
            ),
            _stream_config(
                f"{prefix}_lease_{store}", f"podkit.{prefix}.lease.{store}.>", per_subject=1
            ),
        )
    except BaseException:
        await conn.close()
        raise
    return NatsKV(conn, url, prefix, store, clock or WallClock())


async def open_queue(
    url: BackendURL,
    name: str,
    *,
    clock: Clock | None = None,
    max_attempts: int = 5,
    dedupe_window: float = 3600.0,
    visibility: float = ACK_WAIT,
    **options: Any,
) -> NatsQueue:
    prefix, timeout = _options(url, options)
    n = _name(name)
    conn = await _Conn.open(url, timeout)
    try:
        stream = f"{prefix}_q_{n}"
        await _ensure_streams(
            conn,
            _stream_config(
                stream, f"podkit.{prefix}.q.{n}", retention="workqueue", dedupe=dedupe_window
            ),
            _stream_config(f"{prefix}_qm_{n}", f"podkit.{prefix}.qm.{n}.>", per_subject=1),
            _stream_config(f"{prefix}_qd_{n}", f"podkit.{prefix}.qd.{n}", dedupe=dedupe_window),
        )
        config = {
            "durable_name": "workers",
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": int(visibility * NS),
            "max_deliver": -1,
            "max_ack_pending": -1,
            "replay_policy": "instant",
        }
        info = await _ensure_consumer(conn, stream, config)
    except BaseException:
        await conn.close()
        raise
    queue = NatsQueue(conn, url, name, prefix, clock or WallClock(), max_attempts)
    # the server's own timeout covers a consumer that dies before any delayed NAK
    queue._ack_wait = int(info["config"]["ack_wait"]) / NS
    return queue


async def open_topic(
    url: BackendURL, name: str, *, max_age: float = 0.0, **options: Any
) -> NatsTopic:
    prefix, timeout = _options(url, options)
    n = _name(name)
    conn = await _Conn.open(url, timeout)
    try:
        await _ensure_streams(
            conn, _stream_config(f"{prefix}_t_{n}", f"podkit.{prefix}.t.{n}", max_age=max_age)
        )
    except BaseException:
        await conn.close()
        raise
    return NatsTopic(conn, url, name, prefix)
