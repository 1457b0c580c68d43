"""The KV on Redis (`RedisKV`, `open_kv`).

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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from podkit.aio import discard
from podkit.backends.base import BackendError, Entry, Event, LeaseExpired
from podkit.backends.redis.connection import (
    _LUA_COMMON,
    _NET_ERRORS,
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

HISTORY = 1_000_000  # KV change events kept for watches (MAXLEN ~)

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
