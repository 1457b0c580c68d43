"""One election candidate for benchmarks/failover.py (not meant to be run by hand).

    python _candidate.py podkit URL NAME IDENTITY TTL   # podkit's .venv
    python _candidate.py tooz URL GROUP MEMBER          # the tooz venv

It prints one JSON object per line on stdout, each with `event` and the wall-clock time
`t` (time.time(), comparable with the parent's kill time: same machine):
- `queued`: its candidacy is registered (podkit: its key is under the election prefix;
  tooz: it joined the group and watches for leadership);
- `renew`: a lease renewal (podkit: grant/keep_alive, `t` = when it was sent) or a tooz
  heartbeat (`t` = when it started), so the parent can tell when the lease would expire;
- `gained`: podkit's campaign() returned (leadership by the election alone);
- `leader`: podkit: the first successful fenced write of this leadership; tooz: the
  elected-as-leader callback ran;
- `lost`, `stale`, `error`, `unsupported`: anything else worth reporting.
The podkit leader keeps writing through `FencedResource` every WRITE_EVERY seconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

WRITE_EVERY = 0.05
POLL_EVERY = 0.02
_out = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "t": fields.pop("t", None) or time.time(), **fields})
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------- podkit


async def podkit_candidate(url: str, name: str, identity: str, ttl: float) -> None:
    from podkit.backends import open_kv
    from podkit.election.core import FencedResource, LeaderElection, LeadershipLost, StaleToken

    kv = await open_kv(url)
    grant, keep_alive = kv.grant, kv.keep_alive

    async def timed_grant(seconds: float) -> int:
        sent = time.time()
        lease = await grant(seconds)
        emit("renew", t=sent, lease=lease)
        return lease

    async def timed_keep_alive(lease: int) -> bool:
        sent = time.time()
        alive = await keep_alive(lease)
        if alive:
            emit("renew", t=sent, lease=lease)
        return alive

    kv.grant = timed_grant  # type: ignore[method-assign]
    kv.keep_alive = timed_keep_alive  # type: ignore[method-assign]
    election = LeaderElection(kv, name, identity, ttl)
    resource = FencedResource(kv, f"bench/fenced/{name}")
    while True:
        campaign = asyncio.create_task(election.campaign())
        try:
            while not campaign.done():  # report once our key is in the queue
                session = election.session
                if session is not None and session.lease:
                    entries = await kv.range(election.prefix)
                    if any(e.lease == session.lease for e in entries):
                        break
                await asyncio.sleep(POLL_EVERY)
            emit("queued")
            leader = await campaign
        except LeadershipLost as exc:
            emit("error", why=f"campaign: {exc}")
            await election.resign()
            continue
        emit("gained", token=leader.token)
        first = True
        while election.is_leader:
            try:
                await resource.write(election.token, f"{identity} {time.time()}".encode())
            except StaleToken as exc:
                emit("stale", why=str(exc))
                break
            except Exception as exc:  # a backend hiccup: report, keep leading
                emit("error", why=f"write: {type(exc).__name__}: {exc}")
            else:
                if first:
                    emit("leader", token=election.token)
                    first = False
            await asyncio.sleep(WRITE_EVERY)
        emit("lost", token=leader.token)
        await election.resign()


# ---------------------------------------------------------------------------- tooz


def tooz_candidate(url: str, group: str, member: str) -> None:
    import tooz
    from tooz import coordination

    coordinator = coordination.get_coordinator(url, member.encode())
    heartbeat = coordinator.heartbeat

    def timed_heartbeat() -> Any:
        started = time.time()
        result = heartbeat()
        emit("renew", t=started)
        return result

    coordinator.heartbeat = timed_heartbeat  # type: ignore[method-assign]
    coordinator.start(start_heart=True)
    try:
        group_id = group.encode()
        try:
            coordinator.create_group(group_id).get()
        except coordination.GroupAlreadyExist:
            pass
        coordinator.join_group(group_id).get()

        def elected(event: Any) -> None:
            emit("leader")

        try:
            coordinator.watch_elected_as_leader(group_id, elected)
        except tooz.NotImplemented as exc:
            driver = type(coordinator).__module__
            why = f"{driver} created and joined the group, but watch_elected_as_leader raised"
            emit("unsupported", why=f"{why} NotImplemented({exc!s})")
            return
        emit("queued")
        while True:
            coordinator.run_watchers()
            time.sleep(POLL_EVERY)
    finally:
        coordinator.stop()


def main() -> None:
    kind, *args = sys.argv[1:]
    if kind == "podkit":
        url, name, identity, ttl = args
        run: Any = asyncio.run
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            pass
        run(podkit_candidate(url, name, identity, float(ttl)))
    elif kind == "tooz":
        tooz_candidate(*args)
    else:
        raise SystemExit(f"unknown candidate kind {kind!r} (podkit or tooz)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
