"""Rate limits for the load balancer: token buckets per client key and a global one, sans-IO.

    limiter = RateLimiter("100/s burst 200", global_rate="5000/s", by="ip", clock=clock)

    retry_after = limiter.check(limiter.key(client_ip, request_headers))
    if retry_after:                      # refused: answer 429 with Retry-After: retry_after
        ...

API:
- `Rate.parse(text) -> Rate`: "<count>/<unit>[ burst <n>]", unit s, m, h or d (also
  second, minute, hour, day); "100/s burst 200", "600/m". The burst (bucket size)
  defaults to one second's worth of tokens, at least 1. A malformed text raises
  ValueError naming it.
- `Rate.take(tokens, stamp, now, cost=1.0) -> (tokens, stamp, wait)`: the bucket
  arithmetic, for any storage of a bucket's two numbers.
- `TokenBucket(rate, now)`: `take(now, cost=1.0) -> float` (0.0 when taken, else the
  seconds until it could be), `give(cost)`.
- `LocalBuckets(max_keys)` and `SharedBuckets(max_keys)`: where a limiter keeps its
  buckets, with the same `take(key, rate, now)` and `give(key, rate)` (key None: the
  global bucket) and `evicted`.
- `RateLimiter(rate=None, global_rate=None, by="ip", clock=None, max_keys=65536,
  shared=None)`: `check(key) -> int` (0: admitted; else Retry-After seconds, an integer
  >= 1, rounded up), `key(client_ip, headers) -> str | bytes`, `len()`, and counters
  `admitted`, `limited`, `evicted`. Its buckets are `LocalBuckets`, or `shared`.
- `SharedBuckets(max_keys=65536)`: the buckets in memory that forked processes share, so that
  `podkit lb --workers N` limits the balancer as a whole, not each worker. Made before the
  fork and given to each worker's `RateLimiter(shared=...)`; the clock must then be the
  system's monotonic clock (the default), which all processes share.

A bucket holds at most `burst` tokens and refills at `per_second` by elapsed clock time,
so over any span t a key is admitted at most `per_second * t + burst` times. A request
must pass its key's bucket and then the global one; a refused request takes no token
from either. `by` is "ip" or "header:<name>" (requests without that header are keyed by
their IP). The table of buckets is bounded: when it is full, buckets that have refilled
completely are dropped (a new bucket is full too, so nothing changes), and if that frees
too little the least recently used are dropped.

Shared buckets live in a table of groups of 8 slots, a key's group chosen by its hash;
each slot is a (key tag, tokens, stamp) record, and each group has its own lock (a
byte-range lock of the table's memfd, which the kernel releases when a process dies, even
by kill -9). A key takes its own slot in the group, else an empty one or one whose bucket
has refilled (the same as a new bucket). With no such slot, 8 keys of the group being
active, it shares the fullest bucket with that slot's key (counted in `evicted`): a crowded
group limits more, never less. The table has room for four times `max_keys`.
"""

from __future__ import annotations

import fcntl
import math
import re
import struct
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from podkit.clock import Clock, SystemClock
from podkit.lb.shm import SharedMemory

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(
    r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)s?"
    r"(?:\s+burst\s+(\d+))?\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Rate:
    """Tokens per second and the bucket size."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not self.per_second > 0 or not self.burst >= 1:
            raise ValueError(f"a rate needs per_second > 0 and burst >= 1, not {self!r}")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """A rate from "100/s burst 200", "600/m", "10/h"..."""
        match = _RATE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"rate {text!r}: expected '<count>/<s|m|h|d>[ burst <n>]', e.g. '100/s burst 200'"
            )
        count, unit, burst = match.groups()
        per_second = float(count) / _UNITS[unit[0].lower()]
        if per_second <= 0:
            raise ValueError(f"rate {text!r}: the count must be positive")
        return cls(per_second, float(burst) if burst else max(1.0, per_second))

    def take(
        self, tokens: float, stamp: float, now: float, cost: float = 1.0
    ) -> tuple[float, float, float]:
        """A bucket last seen with `tokens` at `stamp`, refilled to `now`, takes `cost`:
        (tokens, stamp, wait), wait 0.0 when taken, else the seconds until it could be."""
        if now > stamp:
            tokens = min(self.burst, tokens + (now - stamp) * self.per_second)
            stamp = now
        if tokens >= cost - 1e-9:  # refills summed piece by piece lose the last bits
            return max(0.0, tokens - cost), stamp, 0.0
        return tokens, stamp, (cost - tokens) / self.per_second

    def level(self, tokens: float, stamp: float, now: float) -> float:
        """The tokens of a bucket last seen with `tokens` at `stamp`, by `now` (uncapped)."""
        return tokens + (now - stamp) * self.per_second


class TokenBucket:
    """`burst` tokens at most, refilled at `per_second`."""

    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = rate.burst
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens: 0.0 when taken, else the seconds until they would be there."""
        self.tokens, self.stamp, wait = self.rate.take(self.tokens, self.stamp, now, cost)
        return wait

    def give(self, cost: float = 1.0) -> None:
        """Return tokens taken for a request that was refused later on."""
        self.tokens = min(self.rate.burst, self.tokens + cost)

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled completely by `now`."""
        return self.rate.level(self.tokens, self.stamp, now) >= self.rate.burst


class LocalBuckets:
    """Token buckets in this process, by key (None: the global one), at most `max_keys`."""

    def __init__(self, max_keys: int = 65536) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self.evicted = 0  # buckets dropped before they had refilled (table full of active keys)
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._global: TokenBucket | None = None

    def take(self, key: Hashable | None, rate: Rate, now: float, cost: float = 1.0) -> float:
        """`TokenBucket.take` on the key's bucket (a new one is full)."""
        if key is None:
            bucket = self._global
            if bucket is None:
                bucket = self._global = TokenBucket(rate, now)
        else:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._new(key, rate, now)
            else:
                self._buckets.move_to_end(key)
        return bucket.take(now, cost)

    def give(self, key: Hashable | None, rate: Rate, cost: float = 1.0) -> None:
        """Return tokens taken for a request that was refused later on."""
        bucket = self._global if key is None else self._buckets.get(key)
        if bucket is not None:
            bucket.give(cost)

    def __len__(self) -> int:
        return len(self._buckets)

    def _new(self, key: Hashable, rate: Rate, now: float) -> TokenBucket:
        buckets = self._buckets
        if len(buckets) >= self.max_keys:
            # Full buckets behave as new ones: dropping them changes nothing. Free at least
            # an eighth of the table each time, so sweeps stay rare (amortised O(1)).
            for k in [k for k, b in buckets.items() if b.full(now)]:
                del buckets[k]
            target = self.max_keys - max(1, self.max_keys // 8)
            while len(buckets) > target:
                buckets.popitem(last=False)
                self.evicted += 1
        bucket = buckets[key] = TokenBucket(rate, now)
        return bucket


_SLOT = struct.Struct("=Qdd")  # key tag (0: empty), tokens, stamp
GROUP = 8  # slots a key may use, under one lock


class SharedBuckets:
    """Token buckets in memory shared by forked processes, one lock per group of slots."""

    def __init__(self, max_keys: int = 65536) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.groups = max(1, max_keys * 4 // GROUP)  # a quarter full with max_keys active
        self.evicted = 0  # keys that found no slot of their own and shared one (this process)
        self._group_size = GROUP * _SLOT.size
        size = (self.groups + 1) * self._group_size  # group 0: the global bucket
        self._shm = SharedMemory("podkit-rate-buckets", size)
        self._fd, self._mem = self._shm.fd, self._shm.mem

    def take(self, key: Hashable | None, rate: Rate, now: float, cost: float = 1.0) -> float:
        """`TokenBucket.take` on the key's shared bucket (None: the global one)."""
        tag, base = self._group(key)
        mem, fd, size = self._mem, self._fd, self._group_size
        fcntl.lockf(fd, fcntl.LOCK_EX, size, base)
        try:
            offset = self._find(tag, base, rate, now)
            held, tokens, stamp = _SLOT.unpack_from(mem, offset)
            if held != tag and (held == 0 or rate.level(tokens, stamp, now) >= rate.burst):
                held, tokens, stamp = tag, rate.burst, now  # a free slot: a new, full bucket
            tokens, stamp, wait = rate.take(tokens, stamp, now, cost)
            _SLOT.pack_into(mem, offset, held, tokens, stamp)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, size, base)
        return wait

    def give(self, key: Hashable | None, rate: Rate, cost: float = 1.0) -> None:
        """Return tokens taken for a request that was refused later on."""
        tag, base = self._group(key)
        mem, fd, size = self._mem, self._fd, self._group_size
        fcntl.lockf(fd, fcntl.LOCK_EX, size, base)
        try:
            for i in range(GROUP):
                offset = base + i * _SLOT.size
                held, tokens, stamp = _SLOT.unpack_from(mem, offset)
                if held == tag:
                    _SLOT.pack_into(mem, offset, held, min(rate.burst, tokens + cost), stamp)
                    return
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, size, base)

    def _group(self, key: Hashable | None) -> tuple[int, int]:
        if key is None:
            return 1, 0
        tag = (hash(key) & 0xFFFFFFFFFFFFFFFF) or 1  # the same in every forked process
        return tag, (1 + tag % self.groups) * self._group_size

    def _find(self, tag: int, base: int, rate: Rate, now: float) -> int:
        """The key's slot in its group; else an empty one; else one whose bucket has
        refilled (the same as a new bucket); else the fullest, shared with its key, so
        that a crowded group limits more, never less."""
        mem = self._mem
        free = -1
        fullest, most = base, -1.0
        for i in range(GROUP):
            offset = base + i * _SLOT.size
            held, tokens, stamp = _SLOT.unpack_from(mem, offset)
            if held == tag:
                return offset
            if free < 0:
                level = rate.level(tokens, stamp, now)
                if held == 0 or level >= rate.burst:
                    free = offset
                elif level > most:
                    fullest, most = offset, level
        if free >= 0:
            return free
        self.evicted += 1
        return fullest

    def __len__(self) -> int:
        """Keys holding a slot (a scan of the whole table)."""
        return sum(1 for held, _, _ in _SLOT.iter_unpack(self._mem[self._group_size :]) if held)


def _seconds(wait: float) -> int:
    """Whole seconds for Retry-After, rounded up, at least 1 (float noise is not a second)."""
    return max(1, math.ceil(wait - 1e-9))


class RateLimiter:
    """Token buckets per key plus an optional global bucket; `check` says 0 or Retry-After."""

    def __init__(
        self,
        rate: Rate | str | None = None,
        global_rate: Rate | str | None = None,
        by: str = "ip",
        clock: Clock | None = None,
        max_keys: int = 65536,
        shared: SharedBuckets | None = None,
    ) -> None:
        self.rate = Rate.parse(rate) if isinstance(rate, str) else rate
        self.global_rate = Rate.parse(global_rate) if isinstance(global_rate, str) else global_rate
        if by == "ip":
            self._header: bytes | None = None
        elif by.startswith("header:") and by[7:].strip():
            self._header = by[7:].strip().lower().encode("latin-1")
        else:
            raise ValueError(f"rate limit key {by!r}: expected 'ip' or 'header:<name>'")
        self.clock: Clock = clock or SystemClock()
        self.buckets: LocalBuckets | SharedBuckets = (
            shared if shared is not None else LocalBuckets(max_keys)
        )
        self.admitted = 0
        self.limited = 0

    def key(self, client_ip: str, headers: Sequence[tuple[bytes, bytes]]) -> str | bytes:
        """The key a request is limited by: its header value when keyed by a header, else IP."""
        name = self._header
        if name is not None:
            size = len(name)
            for k, v in headers:
                if len(k) == size and k.lower() == name:
                    return v
        return client_ip

    def check(self, key: Hashable) -> int:
        """0 when the request is admitted, else the Retry-After seconds (>= 1)."""
        now = self.clock.now()
        buckets, rate, global_rate = self.buckets, self.rate, self.global_rate
        wait = buckets.take(key, rate, now) if rate is not None else 0.0
        if not wait and global_rate is not None:
            wait = buckets.take(None, global_rate, now)
            if wait and rate is not None:
                buckets.give(key, rate)  # refused after all: the key's token goes back
        if wait:
            self.limited += 1
            return _seconds(wait)
        self.admitted += 1
        return 0

    @property
    def evicted(self) -> int:
        """Keys whose bucket was lost or shared while active (the table was full)."""
        return self.buckets.evicted

    def __len__(self) -> int:
        return len(self.buckets)
