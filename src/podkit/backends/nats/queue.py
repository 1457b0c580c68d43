"""`NatsQueue`: a work-queue stream, a durable pull consumer, a ledger, a dead-letter stream.

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
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from typing import Any

from podkit.aio import retrieve
from podkit.backends.base import Message, QueueStats, StaleReceipt
from podkit.backends.nats.connection import Item, _Conn, _ensure_consumer, _ensure_streams, _options
from podkit.backends.nats.wire import (
    ATTEMPTS,
    ENQUEUED,
    ERROR,
    ID,
    MSG_ID,
    NOT_BEFORE,
    NS,
    _ack_meta,
    _APIError,
    _nak,
    _name,
    _Receipt,
    _stream_config,
)
from podkit.backends.url import BackendURL
from podkit.clock import Clock, WallClock

ACK_WAIT = 30.0  # default queue consumer ack_wait (open_queue's `visibility`)


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
