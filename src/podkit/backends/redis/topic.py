"""The topic on Redis (`RedisTopic`, `RedisSubscription`, `open_topic`).

Topic (keys under `P t:<name>:`): a stream `log` with IDs `<position>-0` from the counter
`seq` (a batch publish is one script), groups by XGROUP CREATE (earliest: 0, latest: $,
position p: p-1), fetch by XAUTOCLAIM (records whose ack_wait passed) then XREADGROUP,
ack by XACK, replay by XRANGE.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from podkit.backends.base import BackendError, Record, StartAt
from podkit.backends.redis.connection import (
    _LUA_COMMON,
    BLOCK_MAX,
    _Arg,
    _Backend,
    _connect,
    _guarded,
    _ms,
    _prefix,
    _token,
)
from podkit.backends.url import BackendURL

# Topic scripts: KEYS[1] is the topic's namespace.
# ARGV: token, MAXLEN ('' = unbounded), payloads. Returns the first position.
_T_PUBLISH = (
    _LUA_COMMON
    + """
local tok, maxlen = ARGV[1], ARGV[2]
local seen = replay(tok)
if seen then return tonumber(seen) end
local n = #ARGV - 2
local first = redis.call('INCRBY', B .. 'seq', n) - n + 1
for i = 1, n do
  local id = string.format('%d-0', first + i - 1)
  if maxlen == '' then
    redis.call('XADD', B .. 'log', id, 'p', ARGV[i + 2])
  else
    redis.call('XADD', B .. 'log', 'MAXLEN', '~', maxlen, id, 'p', ARGV[i + 2])
  end
end
remember(tok, first)
return first
"""
)

# ARGV: group, consumer, count, ack_wait ms. Records whose ack_wait passed, then new ones.
# Returns id, payload, ...
_T_FETCH = (
    _LUA_COMMON
    + """
local log, group, consumer, count = B .. 'log', ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
local function take(entries)
  for _, e in ipairs(entries) do
    if e[2] then
      out[#out + 1] = e[1]
      out[#out + 1] = e[2][2]
    end
  end
end
local claimed = redis.call('XAUTOCLAIM', log, group, consumer, ARGV[4], '0-0', 'COUNT', count)
take(claimed[2])
if #out < 2 * count then
  local new = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count - #out / 2,
    'STREAMS', log, '>')
  if new then take(new[1][2]) end
end
return out
"""
)

# ARGV: group, consumer. Removes the consumer unless it still holds unacked records.
_T_LEAVE = (
    _LUA_COMMON
    + """
local log = B .. 'log'
if #redis.call('XPENDING', log, ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', log, ARGV[1], ARGV[2])
end
return 0
"""
)


def _position(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


class RedisSubscription(_Backend):
    """One consumer of a group; unacked records are claimed back after `ack_wait`."""

    def __init__(self, topic: RedisTopic, group: str, ack_wait: float) -> None:
        super().__init__(topic._where, topic._r, topic._wait)
        self.group = group
        self._topic = topic
        self._consumer = uuid.uuid4().hex
        self._ack_wait = max(1, _ms(ack_wait))

    @_guarded
    async def fetch(self, max_items: int = 100, *, wait: float = 1.0) -> list[Record]:
        if max_items <= 0:
            return []
        t = self._topic
        deadline = time.monotonic() + wait
        args: list[_Arg] = [self.group, self._consumer, max_items, self._ack_wait]
        while True:
            flat = await t._fetch_s(t._keys, args)
            if flat:
                return [Record(_position(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            block = max(1, _ms(min(left, BLOCK_MAX / 2, self._ack_wait / 2000)))
            reply: Any = await t._r.xreadgroup(
                self.group, self._consumer, {t._log: ">"}, count=max_items, block=block
            )
            records = [
                Record(_position(entry_id), fields[b"p"])
                for _stream, entries in reply or ()
                for entry_id, fields in entries
                if fields
            ]
            if records:
                return records

    @_guarded
    async def ack(self, records: Sequence[Record]) -> None:
        if records:
            t = self._topic
            await t._r.xack(t._log, self.group, *(f"{r.position}-0" for r in records))

    async def close(self) -> None:
        t = self._topic
        try:
            await t._leave_s(t._keys, [self.group, self._consumer])
        except ResponseError:
            pass  # the stream or group is gone


class RedisTopic(_Backend):
    """The Redis topic: one stream with IDs `<position>-0`, consumer groups on it."""

    def __init__(
        self,
        url: BackendURL,
        client: Redis,
        wait: float,
        prefix: str,
        name: str,
        max_records: int | None,
    ) -> None:
        super().__init__(url, client, wait)
        self.name = name
        self._ns = f"{prefix}t:{name}:"
        self._keys = [self._ns]
        self._log = f"{self._ns}log"
        self._maxlen = "" if max_records is None else str(max_records)
        script = client.register_script
        self._publish_s = script(_T_PUBLISH)
        self._fetch_s = script(_T_FETCH)
        self._leave_s = script(_T_LEAVE)

    @_guarded
    async def publish(self, payload: bytes) -> int:
        return int(await self._publish_s(self._keys, [_token(), self._maxlen, payload]))

    @_guarded
    async def publish_batch(self, payloads: Sequence[bytes]) -> list[int]:
        if not payloads:
            return []
        first = int(await self._publish_s(self._keys, [_token(), self._maxlen, *payloads]))
        return list(range(first, first + len(payloads)))

    @_guarded
    async def subscribe(
        self, group: str, *, start: StartAt = "earliest", ack_wait: float = 30.0
    ) -> RedisSubscription:
        if start == "earliest":
            at = "0"
        elif start == "latest":
            at = "$"
        else:
            at = f"{max(0, int(start) - 1)}-0"
        try:
            await self._r.xgroup_create(self._log, group, id=at, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise BackendError(f"{self.url}: cannot create group {group!r}: {exc}") from None
        return RedisSubscription(self, group, ack_wait)

    @_guarded
    async def read(self, start: int, limit: int = 100) -> list[Record]:
        if limit <= 0:
            return []
        entries: Any = await self._r.xrange(self._log, f"{max(1, start)}-0", "+", count=limit)
        return [Record(_position(entry_id), fields[b"p"]) for entry_id, fields in entries]

    async def close(self) -> None:
        await self._r.aclose()


async def open_topic(
    url: BackendURL,
    name: str,
    *,
    prefix: str | None = None,
    timeout: float | None = None,
    retries: int = 40,
    max_records: int | None = None,
    **_: Any,
) -> RedisTopic:
    """Open the topic `name` under `prefix`; `max_records` caps the stream (MAXLEN ~)."""
    client, wait = await _connect(url, timeout, retries)
    return RedisTopic(url, client, wait, _prefix(url, prefix), name, max_records)
