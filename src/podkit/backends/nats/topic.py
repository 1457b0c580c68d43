"""`NatsTopic`: a limits-retention stream; groups are durable pull consumers.

Topic (stream `<P>_t_<name>`, limits retention): position = stream sequence; a group is a
durable pull consumer its members share, created at `start` (deliver all, new, or by start
sequence) with the first member's ack_wait; a member with another ack_wait sets its own per
delivery with a delayed NAK. `read` is direct gets by sequence, no consumer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from podkit.backends.base import Record, StartAt
from podkit.backends.nats.connection import Item, _Conn, _ensure_consumer, _ensure_streams, _options
from podkit.backends.nats.wire import NS, _ack_meta, _APIError, _nak, _name, _stream_config
from podkit.backends.url import BackendURL


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
