"""The queue on Redis (`RedisQueue`, `open_queue`).

Queue (keys under `P q:<name>:`): not Streams with consumer groups, whose pending
entries share one min-idle-time per XAUTOCLAIM call (no visibility per delivery, no
extend of one entry, no delay on a retry) and which still need side keys for dead
letters, last errors and idempotency keys. Instead: a list `ready` (FIFO), a zset
`delayed` (id -> due ms), one hash per item field (p payload, e enqueued ms, a attempts,
r receipt, g own delivery group, x last error) so that a batch reads or writes a field
with one variadic command, and delivery groups: one per dequeue call, named by its
receipt, in the zset `running` scored by its visibility deadline, with its ids in `gi`
and its count of current items in `gn`. `extend` moves one item into a group of its own;
an ack or nack releases the item from its group. Expired groups send their current
items back to the front of `ready`; an item taken with `max_attempts` deliveries behind
it is dead-lettered (list `dead`) instead. Idempotency keys are strings `dk:<key>` with
PX dedupe_window; a list `bell` wakes consumers waiting in BLPOP. A batch travels packed
(payloads length-prefixed in one argument, ids joined by ',', messages in one reply
string), so enqueue, dequeue and ack are one round trip and one script run each, and
redis-py parses a few values per call instead of a few per item.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from podkit.backends.base import Message, QueueStats, StaleReceipt
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

# Queue scripts: KEYS[1] is the queue's namespace. Item fields live in one hash per
# field (p payload, e enqueued ms, a attempts, r receipt, g own group after an extend,
# x last error), so a batch reads or writes each field with one variadic command.
# A delivery group (one per dequeue call, named by its receipt; one per extended item)
# sits in `running` scored by its deadline, with its ids in `gi` and its count of
# current items in `gn`.
_Q_COMMON = (
    _LUA_COMMON
    + """
local running, ready = B .. 'running', B .. 'ready'
local function ring()
  redis.call('RPUSH', B .. 'bell', 1)
  redis.call('LTRIM', B .. 'bell', 0, 0)
end
local function hmget(key, ids)
  local out = {}
  for i = 1, #ids, 4000 do
    local part = redis.call('HMGET', key, unpack(ids, i, math.min(i + 3999, #ids)))
    for j = 1, #part do out[#out + 1] = part[j] end
  end
  return out
end
local function split(s)
  local out = {}
  for id in string.gmatch(s, '[^,]+') do out[#out + 1] = id end
  return out
end
local function release(grp, n)
  if redis.call('HINCRBY', B .. 'gn', grp, -n) <= 0 then
    redis.call('ZREM', running, grp)
    redis.call('HDEL', B .. 'gi', grp)
    redis.call('HDEL', B .. 'gn', grp)
  end
end
-- one string for many messages: per message a header (id length, payload length,
-- attempts, enqueued ms, error length or -1), then id, payload and error bytes
local function messages(ids, attempts)
  if #ids == 0 then return '' end
  attempts = attempts or hmget(B .. 'a', ids)
  local p, e, x = hmget(B .. 'p', ids), hmget(B .. 'e', ids), hmget(B .. 'x', ids)
  local out = {}
  for i, id in ipairs(ids) do
    local payload, err = p[i] or '', x[i]
    out[#out + 1] = struct.pack('>I4I4I4di4', #id, #payload, tonumber(attempts[i] or 0),
      tonumber(e[i] or 0), err and #err or -1)
    out[#out + 1] = id
    out[#out + 1] = payload
    if err then out[#out + 1] = err end
  end
  return table.concat(out)
end
"""
)

# ARGV: token, dedupe window ms, delay ms, item count, 'k' if keyed, items: per item an
# optional key (length or -1, then bytes; only when keyed) and the payload (length, then
# bytes), lengths as 4-byte big-endian. Returns the ids joined by ',' (an existing id for
# a known key), or '<first>+<count>' when they are consecutive.
_Q_ENQUEUE = (
    _Q_COMMON
    + """
local tok, window, delay = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n, keyed, items = tonumber(ARGV[4]), ARGV[5] == 'k', ARGV[6]
local seen = replay(tok)
if seen then return seen end
local now = now_ms()
local first = redis.call('INCRBY', B .. 'seq', n) - n
local ids, fresh, p, e = {}, {}, {}, {}
local pos, size = 1, 0
for i = 1, n do
  local id, key = string.format('%d', first + i), nil
  if keyed then
    size, pos = struct.unpack('>i4', items, pos)
    if size >= 0 then
      key = string.sub(items, pos, pos + size - 1)
      pos = pos + size
    end
  end
  size, pos = struct.unpack('>I4', items, pos)
  local payload = string.sub(items, pos, pos + size - 1)
  pos = pos + size
  if key then
    local dk = B .. 'dk:' .. key
    local known = redis.call('GET', dk)
    if known then
      id, payload = known, nil
    else
      redis.call('SET', dk, id, 'PX', window)
    end
  end
  ids[i] = id
  if payload then
    fresh[#fresh + 1] = id
    p[#p + 1] = id
    p[#p + 1] = payload
    e[#e + 1] = id
    e[#e + 1] = now
  end
end
if #fresh > 0 then
  bulk('HSET', B .. 'p', p)
  bulk('HSET', B .. 'e', e)
  if delay > 0 then
    local z = {}
    for _, id in ipairs(fresh) do
      z[#z + 1] = now + delay
      z[#z + 1] = id
    end
    bulk('ZADD', B .. 'delayed', z)
  else
    bulk('RPUSH', ready, fresh)
    ring()
  end
end
local out = string.format('%d+%d', first + 1, n)  -- ids first+1 .. first+n
if #fresh < n then out = table.concat(ids, ',') end
remember(tok, out)
return out
"""
)

# ARGV: token (the receipt of this delivery), max items, visibility ms, max attempts.
# Returns {messages, ms to the next due item or deadline (-1: none or some taken)}.
_Q_DEQUEUE_BODY = """
local tok, want, vis, maxa = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local seen = redis.call('HGET', B .. 'gi', tok)
if seen then  -- a retried call: the same delivery again
  local ids, cur = split(seen), {}
  local r = hmget(B .. 'r', ids)
  for i, id in ipairs(ids) do
    if r[i] == tok then cur[#cur + 1] = id end
  end
  return {messages(cur), -1}
end
local now = now_ms()
-- deliveries whose visibility ran out go back to the front of ready, oldest first
local groups = redis.call('ZRANGEBYSCORE', running, '-inf', now, 'LIMIT', 0, 100)
if #groups > 0 then
  local back = {}
  local lists = hmget(B .. 'gi', groups)
  for k, grp in ipairs(groups) do
    if lists[k] then
      local ids = split(lists[k])
      local r, g = hmget(B .. 'r', ids), hmget(B .. 'g', ids)
      for i, id in ipairs(ids) do
        if r[i] and (g[i] or r[i]) == grp then back[#back + 1] = id end
      end
    end
  end
  bulk('ZREM', running, groups)
  bulk('HDEL', B .. 'gi', groups)
  bulk('HDEL', B .. 'gn', groups)
  if #back > 0 then
    bulk('HDEL', B .. 'r', back)
    bulk('HDEL', B .. 'g', back)
    local rev = {}
    for i = #back, 1, -1 do rev[#rev + 1] = back[i] end
    bulk('LPUSH', ready, rev)
  end
end
local due = redis.call('ZRANGEBYSCORE', B .. 'delayed', '-inf', now, 'LIMIT', 0, 1000)
if #due > 0 then
  bulk('ZREM', B .. 'delayed', due)
  bulk('RPUSH', ready, due)
end
-- take from ready; an item already delivered max attempts times is dead-lettered
local take, attempts, dead = {}, {}, {}
while #take < want do
  local popped = redis.call('LPOP', ready, want - #take)
  if not popped then break end
  local a = hmget(B .. 'a', popped)
  for i, id in ipairs(popped) do
    local n = tonumber(a[i] or '0')
    if n >= maxa then
      dead[#dead + 1] = id
    else
      take[#take + 1] = id
      attempts[#attempts + 1] = n + 1
    end
  end
end
if #dead > 0 then
  for _, id in ipairs(dead) do
    redis.call('HSETNX', B .. 'x', id, 'visibility timeout expired')
  end
  bulk('RPUSH', B .. 'dead', dead)
end
if #take == 0 then
  local nxt = -1
  for _, key in ipairs({B .. 'delayed', running}) do
    local top = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if top[2] then
      local left = math.max(0, tonumber(top[2]) - now)
      if nxt < 0 or left < nxt then nxt = left end
    end
  end
  return {'', nxt}
end
local a, r = {}, {}
for i, id in ipairs(take) do
  a[#a + 1] = id
  a[#a + 1] = attempts[i]
  r[#r + 1] = id
  r[#r + 1] = tok
end
bulk('HSET', B .. 'a', a)
bulk('HSET', B .. 'r', r)
redis.call('ZADD', running, now + vis, tok)
redis.call('HSET', B .. 'gi', tok, table.concat(take, ','))
redis.call('HSET', B .. 'gn', tok, #take)
if redis.call('LLEN', ready) > 0 then ring() end
return {messages(take, attempts), -1}
"""
_Q_DEQUEUE = _Q_COMMON + _Q_DEQUEUE_BODY

# ARGV from index FIRST: per receipt: the receipt, its ids joined by ','. Stale receipts
# are skipped. Sets `acked`, the number of items acked.
_Q_ACK_PART = """
local acked = 0
do
  local done, groups = {}, {}
  for i = FIRST, #ARGV, 2 do
    local receipt, ids = ARGV[i], split(ARGV[i + 1])
    local r, g = hmget(B .. 'r', ids), hmget(B .. 'g', ids)
    for j, id in ipairs(ids) do
      if r[j] == receipt then
        done[#done + 1] = id
        local grp = g[j] or receipt
        groups[grp] = (groups[grp] or 0) + 1
      end
    end
  end
  for grp, n in pairs(groups) do release(grp, n) end
  if #done > 0 then
    for _, field in ipairs({'p', 'e', 'a', 'r', 'g', 'x'}) do bulk('HDEL', B .. field, done) end
  end
  acked = #done
end
"""
_Q_ACK = _Q_COMMON + _Q_ACK_PART.replace("FIRST", "1") + "return acked\n"
# ARGV: the dequeue's four, then the acks as for _Q_ACK: ack, then dequeue, in one call.
_Q_ACK_DEQUEUE = _Q_COMMON + _Q_ACK_PART.replace("FIRST", "5") + _Q_DEQUEUE_BODY

# ARGV: token, id, receipt, delay ms, error ('' = none, else '=' .. error), max attempts.
# Returns 0 for a stale receipt, 1 when retried, 2 when dead-lettered.
_Q_NACK = (
    _Q_COMMON
    + """
local tok, id, receipt, err = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local delay, maxa = tonumber(ARGV[4]), tonumber(ARGV[6])
local seen = replay(tok)
if seen then return tonumber(seen) end
if redis.call('HGET', B .. 'r', id) ~= receipt then return 0 end
release(redis.call('HGET', B .. 'g', id) or receipt, 1)
redis.call('HDEL', B .. 'r', id)
redis.call('HDEL', B .. 'g', id)
if err == '' then
  redis.call('HDEL', B .. 'x', id)
else
  redis.call('HSET', B .. 'x', id, string.sub(err, 2))
end
local result = 1
if tonumber(redis.call('HGET', B .. 'a', id) or '0') >= maxa then
  redis.call('RPUSH', B .. 'dead', id)
  result = 2
elseif delay > 0 then
  redis.call('ZADD', B .. 'delayed', now_ms() + delay, id)
else
  redis.call('RPUSH', ready, id)
  ring()
end
remember(tok, result)
return result
"""
)

# ARGV: id, receipt, visibility ms. The item gets a delivery group of its own.
# Returns 0 for a stale receipt.
_Q_EXTEND = (
    _Q_COMMON
    + """
local id, receipt = ARGV[1], ARGV[2]
if redis.call('HGET', B .. 'r', id) ~= receipt then return 0 end
local deadline = now_ms() + tonumber(ARGV[3])
local own = redis.call('HGET', B .. 'g', id)
if not own then
  own = receipt .. '/' .. id
  release(receipt, 1)
  redis.call('HSET', B .. 'g', id, own)
  redis.call('HSET', B .. 'gi', own, id)
  redis.call('HSET', B .. 'gn', own, 1)
end
redis.call('ZADD', running, deadline, own)
return 1
"""
)

# Returns {depth, in flight, dead}.
_Q_STATS = (
    _Q_COMMON
    + """
local now = now_ms()
local function held(groups)
  local n = 0
  for _, c in ipairs(hmget(B .. 'gn', groups)) do n = n + tonumber(c or '0') end
  return n
end
local expired = held(redis.call('ZRANGEBYSCORE', running, '-inf', now))
local live = held(redis.call('ZRANGEBYSCORE', running, '(' .. now, '+inf'))
return {
  redis.call('LLEN', ready) + redis.call('ZCARD', B .. 'delayed') + expired,
  live,
  redis.call('LLEN', B .. 'dead'),
}
"""
)

# ARGV: limit. Returns the dead-lettered messages, oldest first.
_Q_DEAD = (
    _Q_COMMON
    + """
return messages(redis.call('LRANGE', B .. 'dead', 0, tonumber(ARGV[1]) - 1))
"""
)


_U32, _I32 = struct.Struct(">I"), struct.Struct(">i")
_NO_KEY = _I32.pack(-1)
_HEADER = struct.Struct(">IIIdi")  # id length, payload length, attempts, enqueued ms, error


def _messages(blob: bytes, receipt: str) -> list[Message]:
    """Decode the messages a queue script packed into one string."""
    out: list[Message] = []
    pos, end, size, unpack = 0, len(blob), _HEADER.size, _HEADER.unpack_from
    while pos < end:
        id_len, payload_len, attempts, enqueued, error_len = unpack(blob, pos)
        pos += size
        item_id = blob[pos : pos + id_len].decode()
        pos += id_len
        payload = blob[pos : pos + payload_len]
        pos += payload_len
        error = None
        if error_len >= 0:
            error = blob[pos : pos + error_len].decode()
            pos += error_len
        out.append(Message(item_id, payload, attempts, receipt, enqueued / 1000, error))
    return out


def _ack_args(messages: Sequence[Message]) -> list[_Arg]:
    """The ARGV of _Q_ACK: each receipt, then its ids joined by ','."""
    by_receipt: dict[str, list[str]] = {}
    for m in messages:
        by_receipt.setdefault(m.receipt, []).append(m.id)
    args: list[_Arg] = []
    for receipt, ids in by_receipt.items():
        args += (receipt, ",".join(ids))
    return args


class RedisQueue(_Backend):
    """The Redis queue: a ready list, a zset of due times, delivery groups scored by their
    visibility deadline, one hash per item field; every call is one Lua script."""

    def __init__(
        self,
        url: BackendURL,
        client: Redis,
        wait: float,
        prefix: str,
        name: str,
        max_attempts: int,
        dedupe_window: float,
    ) -> None:
        super().__init__(url, client, wait)
        self.name = name
        self.max_attempts = max_attempts
        self.dequeue_acks = True
        self.dedupe_window = dedupe_window
        self._ns = f"{prefix}q:{name}:"
        self._keys = [self._ns]
        self._bell = f"{self._ns}bell"
        self._window = max(1, _ms(dedupe_window))
        script = client.register_script
        self._enqueue_s = script(_Q_ENQUEUE)
        self._dequeue_s = script(_Q_DEQUEUE)
        self._ack_s = script(_Q_ACK)
        self._ack_dequeue_s = script(_Q_ACK_DEQUEUE)
        self._nack_s = script(_Q_NACK)
        self._extend_s = script(_Q_EXTEND)
        self._stats_s = script(_Q_STATS)
        self._dead_s = script(_Q_DEAD)

    async def _enqueue(
        self, payloads: Sequence[bytes], keys: Sequence[str | None] | None, delay: float
    ) -> list[str]:
        items: list[bytes] = []
        if keys is None:
            for payload in payloads:
                items += (_U32.pack(len(payload)), payload)
        else:
            for payload, key in zip(payloads, keys, strict=True):
                if key is None:
                    items.append(_NO_KEY)
                else:
                    raw = key.encode()
                    items += (_I32.pack(len(raw)), raw)
                items += (_U32.pack(len(payload)), payload)
        args: list[_Arg] = [_token(), self._window, _ms(delay), len(payloads)]
        args += ("" if keys is None else "k", b"".join(items))
        reply: bytes = await self._enqueue_s(self._keys, args)
        first, plus, count = reply.decode().partition("+")
        if plus:
            start = int(first)
            return [str(start + i) for i in range(int(count))]
        return first.split(",")

    @_guarded
    async def enqueue(self, payload: bytes, *, key: str | None = None, delay: float = 0) -> str:
        return (await self._enqueue([payload], None if key is None else [key], delay))[0]

    @_guarded
    async def enqueue_batch(
        self, payloads: Sequence[bytes], *, keys: Sequence[str | None] | None = None
    ) -> list[str]:
        if not payloads:
            return []
        return await self._enqueue(payloads, keys, 0)

    @_guarded
    async def dequeue(
        self,
        max_items: int = 1,
        *,
        visibility: float = 30.0,
        wait: float = 0.0,
        ack: Sequence[Message] = (),
    ) -> list[Message]:
        if max_items <= 0:
            await self.ack(ack)
            return []
        deadline = time.monotonic() + wait
        args: list[_Arg] = [max_items, max(1, _ms(visibility)), self.max_attempts]
        acks = _ack_args(ack)  # sent with the first try only
        while True:
            receipt = _token()
            script = self._ack_dequeue_s if acks else self._dequeue_s
            blob, next_ms = await script(self._keys, [receipt, *args, *acks])
            acks = []
            if blob:
                return _messages(blob, receipt)
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            nap = min(left, BLOCK_MAX / 4 if next_ms < 0 else next_ms / 1000 + 0.002)
            await self._r.blpop([self._bell], timeout=max(0.01, nap))

    @_guarded
    async def ack(self, messages: Sequence[Message]) -> None:
        if messages:
            await self._ack_s(self._keys, _ack_args(messages))

    @_guarded
    async def nack(self, message: Message, *, delay: float = 0, error: str | None = None) -> None:
        err = "" if error is None else "=" + error
        args: list[_Arg] = [
            _token(),
            message.id,
            message.receipt,
            _ms(delay),
            err,
            self.max_attempts,
        ]
        if not await self._nack_s(self._keys, args):
            raise StaleReceipt(f"{self.url}: {message.id} was re-delivered or already done")

    @_guarded
    async def extend(self, message: Message, visibility: float) -> None:
        args: list[_Arg] = [message.id, message.receipt, max(1, _ms(visibility))]
        if not await self._extend_s(self._keys, args):
            raise StaleReceipt(f"{self.url}: {message.id} was re-delivered or already done")

    @_guarded
    async def stats(self) -> QueueStats:
        depth, in_flight, dead = await self._stats_s(self._keys)
        return QueueStats(int(depth), int(in_flight), int(dead))

    @_guarded
    async def dead_letters(self, limit: int = 100) -> list[Message]:
        if limit <= 0:
            return []
        return _messages(await self._dead_s(self._keys, [limit]), "")

    async def close(self) -> None:
        await self._r.aclose()


async def open_queue(
    url: BackendURL,
    name: str,
    *,
    prefix: str | None = None,
    timeout: float | None = None,
    retries: int = 40,
    max_attempts: int = 5,
    dedupe_window: float = 3600.0,
    **_: Any,
) -> RedisQueue:
    """Open the queue `name` under `prefix` (default: the URL's `prefix=`)."""
    client, wait = await _connect(url, timeout, retries)
    return RedisQueue(url, client, wait, _prefix(url, prefix), name, max_attempts, dedupe_window)
