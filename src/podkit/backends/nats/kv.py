"""`NatsKV`: keys as subjects, revisions as stream sequences, leases kept by the clients.

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
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from podkit.aio import retrieve
from podkit.backends.base import BackendError, Entry, Event, LeaseExpired
from podkit.backends.nats.connection import Item, _Conn, _ensure_streams, _Feed, _options
from podkit.backends.nats.wire import (
    CREATED,
    EXPECT,
    LEASE,
    MSG_ID,
    OP,
    WRONG_LAST_SEQUENCE,
    _APIError,
    _key_of,
    _key_tokens,
    _name,
    _Raw,
    _stream_config,
)
from podkit.backends.url import BackendURL
from podkit.clock import Clock, WallClock

HISTORY = 64  # KV messages kept per key
SWEEP_EVERY = 0.5  # seconds between lease sweeps while a watch is open
HEARTBEAT = 1.0  # idle heartbeat of a watch's push consumer
CAS_TRIES = 100


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
