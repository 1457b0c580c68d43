"""`redis://[user:pass@]host:port/db?prefix=P`: KV, Queue and Topic on Redis (rediss:// for TLS).

Every operation that changes state is one Lua script (EVALSHA through redis-py `Script`
objects), so it is atomic and one round trip. `prefix=` namespaces every key. Times are
the server's `TIME`, never the client clock. Options of every open: `prefix`, `timeout`
(seconds for the first answer; also `?timeout=`, default 5), `retries` (default 40).

Reconnects: commands are retried on connection errors and timeouts (40 times, 0.25 to
0.5 s apart once backed off: 10 to 20 s against a refused connection), so the same
objects ride out a server restart. A command whose reply was lost runs again; a script
whose repetition would act twice takes a random request token and keeps its result
under it for `REPLAY_TTL` seconds, so the retry returns the first result instead.
Ack, extend, keep_alive, revoke and XACK are idempotent as they are. A topic fetch that
is retried leaves the first delivery pending: it comes back after ack_wait.

KV (keys under `P kv:`): `rev` is the revision counter (INCR in every change: a fencing
token); a key is a hash `k:<key>` {v value, r revision, c created, l lease}, indexed in
the zset `keys` for prefix ranges; every change is appended to the stream `log` with
ID `<revision>-0` (MAXLEN ~ `history`), and a watch reads it with XREAD BLOCK after the
last revision it saw, so it resumes after a reconnect without gaps or repeats (a gap
means the log was trimmed: BackendError). Leases: zset `leases` (id -> deadline, server
ms), hash `ttl`, set `lk:<id>` of the keys held. Every script first sweeps expired
leases, deleting their keys with delete events at new revisions, so reads never return
them; a watch also sweeps at the next lease deadline and at least once a second, on its
own timer (Redis times out a blocked read only at its next event-loop wake-up: up to
100 ms late on an idle server).

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

Topic (keys under `P t:<name>:`): a stream `log` with IDs `<position>-0` from the counter
`seq` (a batch publish is one script), groups by XGROUP CREATE (earliest: 0, latest: $,
position p: p-1), fetch by XAUTOCLAIM (records whose ack_wait passed) then XREADGROUP,
ack by XACK, replay by XRANGE.

Not for Redis Cluster: scripts build key names inside their namespace.
"""

from __future__ import annotations

import asyncio
import functools
import os
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from podkit.aio import discard, wait_for
from podkit.backends.base import (
    BackendError,
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

DEFAULT_PORT = 6379
REPLAY_TTL = 120  # seconds a write's result is kept for a retried request (> retry budget)
BLOCK_MAX = 1.0  # longest blocking read (XREAD, XREADGROUP, BLPOP), seconds
HISTORY = 1_000_000  # KV change events kept for watches (MAXLEN ~)

_NET_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_Arg = bytes | str | int | float  # what a script argument may be

# ---------------------------------------------------------------------------- Lua

_LUA_COMMON = """
local B = KEYS[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function bulk(cmd, key, args)
  for i = 1, #args, 4000 do
    redis.call(cmd, key, unpack(args, i, math.min(i + 3999, #args)))
  end
end
local function replay(tok)
  if tok == '' then return false end
  return redis.call('GET', B .. 'req:' .. tok)
end
local function remember(tok, value)
  redis.call('SET', B .. 'req:' .. tok, value, 'EX', REPLAY_TTL)
end
""".replace("REPLAY_TTL", str(REPLAY_TTL))

# KV scripts: ARGV[1] is the changelog MAXLEN, ARGV[2] a request token (or '').
_KV_COMMON = (
    _LUA_COMMON
    + """
local NOW = now_ms()
local MAXLEN = ARGV[1]
local function log(rev, kind, key, value)
  local id = string.format('%d-0', rev)
  if value then
    redis.call('XADD', B .. 'log', 'MAXLEN', '~', MAXLEN, id, 't', kind, 'k', key, 'v', value)
  else
    redis.call('XADD', B .. 'log', 'MAXLEN', '~', MAXLEN, id, 't', kind, 'k', key)
  end
end
local function remove(key)
  local kk = B .. 'k:' .. key
  local lease = redis.call('HGET', kk, 'l')
  if lease and lease ~= '' then redis.call('SREM', B .. 'lk:' .. lease, key) end
  redis.call('DEL', kk)
  redis.call('ZREM', B .. 'keys', key)
  local rev = redis.call('INCR', B .. 'rev')
  log(rev, 'd', key, false)
  return rev
end
local function drop_lease(lease)
  local lk = B .. 'lk:' .. lease
  local held = redis.call('SMEMBERS', lk)
  table.sort(held)
  for _, key in ipairs(held) do
    if redis.call('HGET', B .. 'k:' .. key, 'l') == lease then remove(key) end
  end
  redis.call('DEL', lk)
  redis.call('ZREM', B .. 'leases', lease)
  redis.call('HDEL', B .. 'ttl', lease)
end
local function sweep()
  for _, lease in ipairs(redis.call('ZRANGEBYSCORE', B .. 'leases', '-inf', NOW)) do
    drop_lease(lease)
  end
end
local function alive(lease)
  return redis.call('ZSCORE', B .. 'leases', lease)
end
"""
)

# put/create/update. ARGV: maxlen, token, op, key, value, lease ('' = none), revision.
# Returns the new revision, -1 when the condition failed, -2 when the lease is dead.
_KV_WRITE = (
    _KV_COMMON
    + """
local tok, op, key, value, lease, want = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local seen = replay(tok)
if seen then return tonumber(seen) end
sweep()
local kk = B .. 'k:' .. key
local old = redis.call('HMGET', kk, 'r', 'c', 'l')
if op == 'create' and old[1] then return -1 end
if op == 'update' and old[1] ~= want then return -1 end
if lease ~= '' and not alive(lease) then return -2 end
local rev = redis.call('INCR', B .. 'rev')
if old[3] and old[3] ~= '' and old[3] ~= lease then
  redis.call('SREM', B .. 'lk:' .. old[3], key)
end
redis.call('HSET', kk, 'v', value, 'r', rev, 'c', old[2] or rev, 'l', lease)
if lease ~= '' then redis.call('SADD', B .. 'lk:' .. lease, key) end
if not old[1] then redis.call('ZADD', B .. 'keys', 0, key) end
log(rev, 'p', key, value)
remember(tok, rev)
return rev
"""
)

# delete/delete_if. ARGV: maxlen, token, key, revision ('' = any). Returns 1 if deleted.
_KV_DELETE = (
    _KV_COMMON
    + """
local tok, key, want = ARGV[2], ARGV[3], ARGV[4]
local seen = replay(tok)
if seen then return tonumber(seen) end
sweep()
local rev = redis.call('HGET', B .. 'k:' .. key, 'r')
if not rev or (want ~= '' and rev ~= want) then return 0 end
remove(key)
remember(tok, 1)
return 1
"""
)

# grant/keep/revoke. ARGV: maxlen, token, op, lease id or ttl in ms.
_KV_LEASE = (
    _KV_COMMON
    + """
local tok, op, arg = ARGV[2], ARGV[3], ARGV[4]
local seen = replay(tok)
if seen then return tonumber(seen) end
sweep()
if op == 'grant' then
  local id = redis.call('INCR', B .. 'leaseid')
  redis.call('ZADD', B .. 'leases', NOW + tonumber(arg), id)
  redis.call('HSET', B .. 'ttl', id, arg)
  remember(tok, id)
  return id
end
if not alive(arg) then return 0 end
if op == 'keep' then
  redis.call('ZADD', B .. 'leases', 'XX', NOW + tonumber(redis.call('HGET', B .. 'ttl', arg)), arg)
else
  drop_lease(arg)
end
return 1
"""
)

# get. ARGV: maxlen, '', key. Returns {value, revision, created, lease} or nil.
_KV_GET = (
    _KV_COMMON
    + """
sweep()
local e = redis.call('HMGET', B .. 'k:' .. ARGV[3], 'v', 'r', 'c', 'l')
if not e[2] then return false end
return e
"""
)

# range. ARGV: maxlen, '', prefix. Returns key, value, revision, created, lease, ...
_KV_RANGE = (
    _KV_COMMON
    + """
sweep()
local p = ARGV[3]
local out = {}
for _, key in ipairs(redis.call('ZRANGEBYLEX', B .. 'keys', '[' .. p, '(' .. p .. '\\255')) do
  local e = redis.call('HMGET', B .. 'k:' .. key, 'v', 'r', 'c', 'l')
  if e[2] then
    out[#out + 1] = key
    for i = 1, 4 do out[#out + 1] = e[i] end
  end
end
return out
"""
)

# the watch's sweep. ARGV: maxlen. Returns {revision, ms to the next lease deadline or -1}.
_KV_SWEEP = (
    _KV_COMMON
    + """
sweep()
local nxt = redis.call('ZRANGE', B .. 'leases', 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then wait = math.max(0, tonumber(nxt[2]) - NOW) end
return {tonumber(redis.call('GET', B .. 'rev') or '0'), wait}
"""
)

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


# ---------------------------------------------------------------------------- connection


def _token() -> str:
    return os.urandom(8).hex()


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _client(url: BackendURL, timeout: float, retries: int) -> Redis:
    db = url.path.strip("/") or "0"
    if not db.isdigit():
        raise BackendError(f"{url.masked}: the path must be a database number, not {url.path!r}")
    backoff = EqualJitterBackoff(cap=0.5, base=0.02) if retries else NoBackoff()
    return Redis(
        host=url.host or "127.0.0.1",
        port=url.port or DEFAULT_PORT,
        db=int(db),
        username=url.username,
        password=url.password,
        ssl=url.scheme == "rediss",
        socket_connect_timeout=timeout,
        socket_timeout=timeout + BLOCK_MAX,
        retry=Retry(backoff, retries),
        decode_responses=False,
        protocol=2,  # reply shapes (XREAD, XREADGROUP) as parsed below
    )


async def _connect(url: BackendURL, timeout: float | None, retries: int) -> tuple[Redis, float]:
    """A client with retries, after one PING without retries answered within `timeout`;
    and that timeout."""
    try:
        wait = float(timeout if timeout is not None else url.query.get("timeout", 5.0))
    except ValueError:
        raise BackendError(f"{url.masked}: timeout must be seconds") from None
    probe = _client(url, wait, 0)
    try:
        await wait_for(probe.ping(), wait)
    except AuthenticationError as exc:
        raise BackendError(f"{url.masked}: {exc}") from None
    except (TimeoutError, *_NET_ERRORS) as exc:
        raise url.unavailable(DEFAULT_PORT, wait, str(exc) or type(exc).__name__) from None
    except RedisError as exc:
        raise BackendError(f"{url.masked}: {exc}") from None
    finally:
        await probe.aclose()
    return _client(url, wait, retries), wait


def _prefix(url: BackendURL, prefix: str | None) -> str:
    return prefix if prefix is not None else url.query.get("prefix", "")


class _Backend:
    """What every object of this driver holds: the client, its URL and timeout."""

    def __init__(self, url: BackendURL, client: Redis, wait: float) -> None:
        self.url = url.masked
        self._where = url
        self._wait = wait
        self._r = client

    def _failed(self, exc: RedisError | OSError) -> BackendError:
        if isinstance(exc, _NET_ERRORS):
            return self._where.unavailable(DEFAULT_PORT, self._wait, exc)
        return BackendError(f"{self.url}: {exc}")


S = TypeVar("S", bound=_Backend)
P = ParamSpec("P")
R = TypeVar("R")


def _guarded(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Report redis-py errors (after its retries) as BackendUnavailable or BackendError."""

    @functools.wraps(method)
    async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc

    return call


# ---------------------------------------------------------------------------- KV


class RedisKV(_Backend):
    """The Redis KV: revisions, compare-and-swap, leases on server time, stream watches."""

    def __init__(
        self, url: BackendURL, client: Redis, wait: float, prefix: str, history: int
    ) -> None:
        super().__init__(url, client, wait)
        self._ns = f"{prefix}kv:"
        self._keys = [self._ns]
        self._log = f"{self._ns}log"
        self._history = history
        script = client.register_script
        self._write_s = script(_KV_WRITE)
        self._delete_s = script(_KV_DELETE)
        self._lease_s = script(_KV_LEASE)
        self._get_s = script(_KV_GET)
        self._range_s = script(_KV_RANGE)
        self._sweep_s = script(_KV_SWEEP)

    async def _run(self, script: AsyncScript, *args: _Arg) -> Any:
        return await script(self._keys, [self._history, *args])

    async def _write(
        self, op: str, key: str, value: bytes, lease: int | None, revision: int | None
    ) -> int | None:
        lease_arg = "" if lease is None else str(lease)
        want = "" if revision is None else str(revision)
        rev = int(await self._run(self._write_s, _token(), op, key, value, lease_arg, want))
        if rev == -2:
            raise LeaseExpired(f"{self.url}: lease {lease} is not alive")
        return None if rev < 0 else rev

    @staticmethod
    def _entry(key: str, fields: Sequence[bytes | None]) -> Entry:
        value, rev, created, lease = fields
        return Entry(
            key,
            value or b"",
            int(rev or 0),
            int(created or 0),
            int(lease) if lease else None,
        )

    @_guarded
    async def get(self, key: str) -> Entry | None:
        fields = await self._run(self._get_s, "", key)
        return None if fields is None else self._entry(key, fields)

    @_guarded
    async def range(self, prefix: str) -> list[Entry]:
        flat = await self._run(self._range_s, "", prefix)
        return [self._entry(flat[i].decode(), flat[i + 1 : i + 5]) for i in range(0, len(flat), 5)]

    @_guarded
    async def revision(self) -> int:
        return int((await self._run(self._sweep_s))[0])

    @_guarded
    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        rev = await self._write("put", key, value, lease, None)
        if rev is None:  # pragma: no cover - put has no condition
            raise BackendError(f"{self.url}: put {key!r} failed")
        return rev

    @_guarded
    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int | None:
        return await self._write("create", key, value, lease, None)

    @_guarded
    async def update(
        self, key: str, value: bytes, *, revision: int, lease: int | None = None
    ) -> int | None:
        return await self._write("update", key, value, lease, revision)

    @_guarded
    async def delete(self, key: str) -> bool:
        return bool(await self._run(self._delete_s, _token(), key, ""))

    @_guarded
    async def delete_if(self, key: str, *, revision: int) -> bool:
        return bool(await self._run(self._delete_s, _token(), key, str(revision)))

    @_guarded
    async def grant(self, ttl: float) -> int:
        return int(await self._run(self._lease_s, _token(), "grant", max(1, _ms(ttl))))

    @_guarded
    async def keep_alive(self, lease: int) -> bool:
        return bool(await self._run(self._lease_s, "", "keep", str(lease)))

    @_guarded
    async def revoke(self, lease: int) -> None:
        await self._run(self._lease_s, "", "revoke", str(lease))

    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncIterator[Event]:
        """XREAD BLOCK on the changelog after the last revision seen; sweeps leases at the
        next lease deadline and at least once a second; retries connection errors forever.

        The sweep runs on this client's timer, beside the blocked read (on another pooled
        connection), not when the read times out: Redis ends a blocked command's timeout
        only when its event loop next wakes up, on an idle server at the next serverCron
        tick (every 100 ms at the default hz 10), which would delay an expired lease's
        delete event, and so a failover, by up to 100 ms. A sweep that deletes keys
        appends their events to the log, which ends the read at once."""
        last = None if start_revision is None else max(0, start_revision - 1)
        known = 0  # the highest revision the server has shown
        next_sweep = 0.0
        failures = 0
        read: asyncio.Future[Any] | None = None  # the XREAD in flight
        try:
            while True:
                try:
                    if last is None or time.monotonic() >= next_sweep:
                        rev, wait_ms = await self._run(self._sweep_s)
                        if rev < known:
                            raise BackendError(
                                f"{self.url}: the revision went back from {known} to {rev} "
                                f"(the server lost data): the watch of {key!r} cannot resume"
                            )
                        known = max(known, rev)
                        if last is None:
                            last = rev
                        wait = BLOCK_MAX if wait_ms < 0 else min(BLOCK_MAX, wait_ms / 1000 + 0.002)
                        next_sweep = time.monotonic() + wait
                    if read is None:
                        read = asyncio.ensure_future(
                            self._r.xread(
                                {self._log: f"{last}-0"}, count=1000, block=_ms(BLOCK_MAX)
                            )
                        )
                    left = next_sweep - time.monotonic()
                    if left > 0:
                        await asyncio.wait({read}, timeout=left)
                    if not read.done():
                        continue  # the sweep is due; the read stays in flight
                    done, read = read, None
                    reply: Any = done.result()
                    failures = 0
                except _NET_ERRORS:
                    failures += 1
                    await asyncio.sleep(min(1.0, 0.02 * 2**failures))
                    continue
                except RedisError as exc:
                    raise self._failed(exc) from exc
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        rev = int(entry_id.split(b"-", 1)[0])
                        if rev != last + 1:
                            raise BackendError(
                                f"{self.url}: watch of {key!r} cannot resume at revision "
                                f"{last + 1}: the changelog was trimmed up to {rev}"
                            )
                        last, known = rev, max(known, rev)
                        name = fields[b"k"].decode()
                        if name == key or (prefix and name.startswith(key)):
                            if fields[b"t"] == b"p":
                                yield Event("put", name, fields[b"v"], rev)
                            else:
                                yield Event("delete", name, None, rev)
        finally:
            if read is not None:
                discard(read)  # a cancelled command: redis-py drops its connection

    async def close(self) -> None:
        await self._r.aclose()


# ---------------------------------------------------------------------------- Queue


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


# ---------------------------------------------------------------------------- Topic


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


# ---------------------------------------------------------------------------- opening


async def open_kv(
    url: BackendURL,
    *,
    prefix: str | None = None,
    timeout: float | None = None,
    retries: int = 40,
    history: int = HISTORY,
    **_: Any,
) -> RedisKV:
    """Open the KV under `prefix` (default: the URL's `prefix=`)."""
    client, wait = await _connect(url, timeout, retries)
    return RedisKV(url, client, wait, _prefix(url, prefix), history)


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
