"""Which upstream hosts may get traffic: readiness, active checks, outlier ejection, draining.

    health = HostHealth(ActiveCheck(path="/healthz", interval=5), Outliers(), clock=clock)
    health.set_hosts(["10.0.0.1:8080", "10.0.0.2:8080"])

    hosts = health.eligible()                 # a tuple; the same object until something changes
    health.begin(host)                        # a request is sent to `host`
    health.record_result(host, status)        # its outcome: an HTTP status or CONNECT_ERROR

    for host in health.due_checks():          # the checker: GET check.path on each ...
        health.record_check(host, passed)     # ... and report; sleep health.next_check_in()

API:
- `ActiveCheck(path="/healthz", interval=5.0, timeout=1.0, healthy_threshold=2,
  unhealthy_threshold=3)`, `ActiveCheck.passed(status) -> bool` (2xx and 3xx pass).
- `Outliers(consecutive_5xx=5, consecutive_connect_failures=3, base_ejection_time=30.0,
  max_ejection_time=300.0, max_ejection_percent=10.0, interval=10.0)`; a threshold of 0
  turns that rule off.
- `HostHealth(active=None, outliers=Outliers(), clock=None, on_event=None)`:
  `add(host, ready=True)`, `remove(host)`, `set_hosts(hosts)`, `set_ready(host, ready)`,
  `eligible() -> tuple[str, ...]`, `begin(host)`, `record_result(host, status)`,
  `due_checks() -> list[str]`, `record_check(host, passed)`, `next_check_in() -> float`,
  `state(host) -> HostState | None`, `hosts() -> list[str]`, counters `ejections`,
  `ejections_skipped`.
- `SharedHealth(max_hosts=4096)`: ejections and active-check verdicts in memory shared by
  forked processes. Each `HostHealth` given it publishes its own ejections and verdicts,
  adopts the others' on `sync_shared()`, and checks only the hosts `checks_here` accepts
  (`owner_of(host, n)` spreads them over n processes).
- `HealthEvent(kind, host, at, until)` is passed to `on_event` for each change: "ejected",
  "ejection_skipped" (over the ejection cap), "returned", "healthy", "unhealthy", "ready",
  "not_ready", "draining", "removed".

A host is eligible when it is ready, passes active checks (when configured), is not
ejected and is not draining. Active checks flip a host after `healthy_threshold`
consecutive passes or `unhealthy_threshold` consecutive failures; a new host is checked
at once and is healthy after its first pass. Outlier ejection: `consecutive_5xx`
responses of 5xx or connect errors, or `consecutive_connect_failures` connect errors in a
row, eject a host for `base_ejection_time * times ejected`, capped at
`max_ejection_time`; the count of times ejected goes down by one per `interval` spent
back in service. Ejection is skipped when it would put more than `max_ejection_percent`
of the hosts out, except that one host may always be ejected. A removed host drains: it
gets no new requests and is forgotten once its last request in flight has ended.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

from podkit.clock import Clock, SystemClock
from podkit.lb.shm import SharedMemory

CONNECT_ERROR: Final = 0  # the status to record when no response came (refused, reset)
EventKind = Literal[
    "ejected",
    "ejection_skipped",
    "returned",
    "healthy",
    "unhealthy",
    "ready",
    "not_ready",
    "draining",
    "removed",
]


@dataclass(frozen=True, slots=True)
class ActiveCheck:
    """Periodic HTTP checks of each host."""

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ValueError("active checks need interval > 0 and thresholds >= 1")

    @staticmethod
    def passed(status: int) -> bool:
        """A check passes on 2xx and 3xx, as Kubernetes probes do."""
        return 200 <= status < 400


@dataclass(frozen=True, slots=True)
class Outliers:
    """Passive outlier ejection: hosts that keep failing are taken out for a while."""

    consecutive_5xx: int = 5
    consecutive_connect_failures: int = 3
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 10.0
    interval: float = 10.0  # back in service this long: one ejection forgiven


@dataclass(frozen=True, slots=True)
class HealthEvent:
    kind: EventKind
    host: str
    at: float
    until: float | None = None  # for "ejected": when the host returns


class HostState:
    """What is known about one host."""

    __slots__ = (
        "checking",
        "consecutive_5xx",
        "consecutive_connect",
        "draining",
        "ejected_until",
        "ejections",
        "fails",
        "healthy",
        "here",
        "in_flight",
        "next_check",
        "passes",
        "ready",
        "returned_at",
        "unchecked",
    )

    def __init__(self, ready: bool, healthy: bool, now: float, here: bool = True) -> None:
        self.ready = ready
        self.healthy = healthy
        self.here = here  # this process runs its active checks
        self.draining = False
        self.in_flight = 0
        self.consecutive_5xx = 0
        self.consecutive_connect = 0
        self.ejected_until: float | None = None
        self.ejections = 0  # the multiplier of the next ejection time
        self.returned_at = now
        self.passes = 0
        self.fails = 0
        self.next_check = now
        self.checking = False
        self.unchecked = True  # no active check reported yet

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None


_HOST = struct.Struct("=Qdbd")  # host tag (0: empty), ejected until, verdict, written at
UNKNOWN, HEALTHY, UNHEALTHY = 0, 1, 2
_PROBES = 16  # slots a host may take, from its tag's
STALE = 600.0  # seconds unwritten (and no ejection running) before a slot is taken over


@functools.lru_cache(maxsize=65536)
def _tag(host: str) -> int:
    digest = hashlib.blake2b(host.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def owner_of(host: str, processes: int) -> int:
    """The process (0 to processes - 1) that runs the active checks of `host`."""
    return _tag(host) % max(1, processes)


class SharedHealth:
    """Per-host ejections and active-check verdicts in memory that forked processes share
    (a memfd mapping, one fcntl lock); made before the fork. A slot not written for
    `STALE` seconds (a host long gone) is taken over by a new host; a host that still
    finds no slot is not shared: each process judges it alone."""

    def __init__(self, max_hosts: int = 4096) -> None:
        if max_hosts < 1:
            raise ValueError("max_hosts must be at least 1")
        self.slots = max_hosts
        self._shm = SharedMemory("podkit-host-health", max_hosts * _HOST.size)
        self._fd, self._mem = self._shm.fd, self._shm.mem

    def publish(
        self,
        host: str,
        now: float,
        *,
        ejected_until: float | None = None,
        verdict: int | None = None,
    ) -> None:
        """Record, at `now`, an ejection (kept if later than the one there) and/or a
        verdict."""
        tag = _tag(host)
        mem, fd = self._mem, self._fd
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            offset = self._slot(tag, now)
            if offset < 0:
                return
            held, until, last, _ = _HOST.unpack_from(mem, offset)
            if held != tag:  # a new slot (or one taken over): nothing known yet
                until, last = 0.0, UNKNOWN
            if ejected_until is not None:
                until = max(until, ejected_until)
            if verdict is not None:
                last = verdict
            _HOST.pack_into(mem, offset, tag, until, last, now)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def read(self, hosts: Iterable[str]) -> dict[str, tuple[float, int]]:
        """(ejected until, verdict) of each of `hosts` that has a slot."""
        out: dict[str, tuple[float, int]] = {}
        mem, fd = self._mem, self._fd
        fcntl.lockf(fd, fcntl.LOCK_SH)
        try:
            for host in hosts:
                offset = self._slot(_tag(host))
                if offset >= 0:
                    _, until, verdict, _ = _HOST.unpack_from(mem, offset)
                    out[host] = (until, verdict)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        return out

    def _slot(self, tag: int, now: float | None = None) -> int:
        """The offset of `tag`'s slot, or -1. With `now` (to write), failing that an
        empty slot, or one stale at `now`, whichever comes first in the probe order."""
        mem = self._mem
        spare = -1
        for i in range(min(_PROBES, self.slots)):
            offset = ((tag + i) % self.slots) * _HOST.size
            held, until, _, written = _HOST.unpack_from(mem, offset)
            if held == tag:
                return offset
            stale = held == 0 or (now is not None and written < now - STALE and until <= now)
            if spare < 0 and now is not None and stale:
                spare = offset
            if held == 0:
                break  # a tag is never past an empty slot: none was ever freed before it
        return spare


class HostHealth:
    """Eligibility of a set of hosts from readiness, checks, outliers and draining."""

    def __init__(
        self,
        active: ActiveCheck | None = None,
        outliers: Outliers | None = Outliers(),
        clock: Clock | None = None,
        on_event: Callable[[HealthEvent], None] | None = None,
        shared: SharedHealth | None = None,
        checks_here: Callable[[str], bool] | None = None,
    ) -> None:
        self.active = active
        self.outliers = outliers
        self.clock: Clock = clock or SystemClock()
        self.on_event = on_event
        self.shared = shared
        self.checks_here = checks_here  # None: every host
        self._hosts: dict[str, HostState] = {}
        self._eligible: tuple[str, ...] = ()
        self._stale = False  # _eligible must be recomputed
        self._next_return = float("inf")  # the earliest end of an ejection
        self.ejections = 0
        self.ejections_skipped = 0

    # -- membership --

    def add(self, host: str, ready: bool = True) -> None:
        """Add a host (or take a draining one back)."""
        now = self.clock.now()
        state = self._hosts.get(host)
        if state is None:
            here = self.checks_here is None or self.checks_here(host)
            self._hosts[host] = HostState(ready, self.active is None, now, here)
        elif state.draining:
            state.draining = False
        else:
            return
        self._stale = True

    def remove(self, host: str) -> None:
        """Drain a host: no new requests; forgotten when its requests in flight have ended."""
        state = self._hosts.get(host)
        if state is None or state.draining:
            return
        state.draining = True
        self._stale = True
        if state.in_flight:
            self._emit("draining", host)
        else:
            self._forget(host)

    def set_hosts(self, hosts: Iterable[str]) -> None:
        """Make the membership exactly `hosts`: add the new ones, drain the others."""
        wanted = dict.fromkeys(hosts)
        for host in [h for h in self._hosts if h not in wanted]:
            self.remove(host)
        for host in wanted:
            self.add(host)

    def set_ready(self, host: str, ready: bool) -> None:
        state = self._hosts.get(host)
        if state is not None and state.ready != ready:
            state.ready = ready
            self._stale = True
            self._emit("ready" if ready else "not_ready", host)

    def hosts(self) -> list[str]:
        """Every known host, draining ones included."""
        return list(self._hosts)

    def state(self, host: str) -> HostState | None:
        return self._hosts.get(host)

    # -- the request path --

    def eligible(self) -> tuple[str, ...]:
        """The hosts that may get new requests now."""
        if self.clock.now() >= self._next_return:
            self._return_ejected()
        if self._stale:
            self._stale = False
            self._eligible = tuple(
                h
                for h, s in self._hosts.items()
                if s.ready and s.healthy and not s.draining and s.ejected_until is None
            )
        return self._eligible

    def begin(self, host: str) -> None:
        """A request was sent to `host`."""
        state = self._hosts.get(host)
        if state is not None:
            state.in_flight += 1

    def record_result(self, host: str, status: int) -> None:
        """The outcome of a request begun on `host`: its status, or CONNECT_ERROR."""
        state = self._hosts.get(host)
        if state is None:
            return
        if state.in_flight:
            state.in_flight -= 1
        if state.draining:
            if not state.in_flight:
                self._forget(host)
            return
        rules = self.outliers
        if rules is None:
            return
        if status >= 500 or status == CONNECT_ERROR:
            state.consecutive_5xx += 1
            if status == CONNECT_ERROR:
                state.consecutive_connect += 1
            else:
                state.consecutive_connect = 0
            if self.clock.now() >= self._next_return:
                self._return_ejected()
            if state.ejected_until is None and (
                0 < rules.consecutive_5xx <= state.consecutive_5xx
                or 0 < rules.consecutive_connect_failures <= state.consecutive_connect
            ):
                self._eject(host, state, rules)
        else:
            state.consecutive_5xx = 0
            state.consecutive_connect = 0

    # -- active checks --

    def due_checks(self) -> list[str]:
        """Hosts whose active check is due; each is marked as being checked until reported."""
        if self.active is None:
            return []
        now = self.clock.now()
        due = [
            h
            for h, s in self._hosts.items()
            if s.here and not s.draining and not s.checking and s.next_check <= now
        ]
        for h in due:
            self._hosts[h].checking = True
        return due

    def next_check_in(self) -> float:
        """Seconds until the next check is due (0.0 if one is due now)."""
        if self.active is None:
            return float("inf")
        now = self.clock.now()
        times = [
            s.next_check
            for s in self._hosts.values()
            if s.here and not s.draining and not s.checking
        ]
        return max(0.0, min(times) - now) if times else self.active.interval

    def record_check(self, host: str, passed: bool) -> None:
        """The result of an active check of `host`."""
        state = self._hosts.get(host)
        active = self.active
        if state is None or active is None:
            return
        state.checking = False
        state.next_check = self.clock.now() + active.interval
        if passed:
            state.fails = 0
            state.passes += 1
            if not state.healthy and (state.unchecked or state.passes >= active.healthy_threshold):
                state.healthy = True
                self._stale = True
                self._emit("healthy", host)
        else:
            state.passes = 0
            state.fails += 1
            if state.healthy and state.fails >= active.unhealthy_threshold:
                state.healthy = False
                self._stale = True
                self._emit("unhealthy", host)
        state.unchecked = False
        if self.shared is not None:
            verdict = HEALTHY if state.healthy else UNHEALTHY
            self.shared.publish(host, self.clock.now(), verdict=verdict)

    def sync_shared(self) -> bool:
        """Adopt the other processes' ejections, and their verdicts on the hosts this one
        does not check; True if eligibility may have changed."""
        shared = self.shared
        if shared is None:
            return False
        now = self.clock.now()
        changed = False
        for host, (until, verdict) in shared.read(self._hosts).items():
            state = self._hosts[host]
            if state.draining:
                continue
            if until > now and (state.ejected_until is None or until > state.ejected_until):
                state.ejected_until = until
                state.consecutive_5xx = state.consecutive_connect = 0
                self._next_return = min(self._next_return, until)
                changed = True
            if self.active is not None and verdict != UNKNOWN and not state.here:
                healthy = verdict == HEALTHY
                if state.healthy != healthy or state.unchecked:
                    state.healthy = healthy
                    state.unchecked = False
                    changed = True
        if changed:
            self._stale = True
        return changed

    # -- internals --

    def _eject(self, host: str, state: HostState, rules: Outliers) -> None:
        now = self.clock.now()
        out = sum(1 for s in self._hosts.values() if s.ejected_until is not None)
        total = sum(1 for s in self._hosts.values() if not s.draining)
        if out and (out + 1) * 100 > rules.max_ejection_percent * total:
            self.ejections_skipped += 1
            self._emit("ejection_skipped", host)
            return
        if rules.interval > 0:  # forgive one ejection per interval spent back in service
            forgiven = int((now - state.returned_at) / rules.interval)
            state.ejections = max(0, state.ejections - forgiven)
        state.ejections += 1
        until = now + min(rules.base_ejection_time * state.ejections, rules.max_ejection_time)
        state.ejected_until = until
        state.consecutive_5xx = 0
        state.consecutive_connect = 0
        self._next_return = min(self._next_return, until)
        self._stale = True
        self.ejections += 1
        if self.shared is not None:
            self.shared.publish(host, now, ejected_until=until)
        self._emit("ejected", host, until)

    def _return_ejected(self) -> None:
        now = self.clock.now()
        upcoming = float("inf")
        for host, state in self._hosts.items():
            until = state.ejected_until
            if until is None:
                continue
            if until <= now:
                state.ejected_until = None
                state.returned_at = until
                self._stale = True
                self._emit("returned", host)
            else:
                upcoming = min(upcoming, until)
        self._next_return = upcoming

    def _forget(self, host: str) -> None:
        del self._hosts[host]
        self._stale = True
        self._emit("removed", host)

    def _emit(self, kind: EventKind, host: str, until: float | None = None) -> None:
        if self.on_event is not None:
            self.on_event(HealthEvent(kind, host, self.clock.now(), until))
