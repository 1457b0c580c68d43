"""A candidate for the partition fault test: campaigns forever; while it leads it writes
to a fenced resource every 20 ms. Logs JSON lines (gain, loss) to argv[5].

    python candidate.py URL NAME IDENTITY TTL LOG
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from podkit.aio import wait_for
from podkit.backends import open_kv
from podkit.election import FencedResource, LeaderElection, StaleToken

RESOURCE = "fault-test/resource"


async def main(url: str, name: str, identity: str, ttl: float, log_path: str) -> None:
    log = open(log_path, "a", buffering=1)  # noqa: SIM115

    def emit(**fields: Any) -> None:
        log.write(json.dumps({"id": identity, "t": time.time(), **fields}) + "\n")

    kv = await open_kv(url)
    guard = FencedResource(kv, RESOURCE)
    emit(ev="start")
    while True:
        election = LeaderElection(kv, name, identity, ttl)
        try:
            leader = await election.campaign()
        except Exception as exc:  # unreachable backend, lost session: queue again
            emit(ev="campaign-failed", error=repr(exc)[:200])
            with contextlib.suppress(Exception):
                await wait_for(election.resign(), ttl)
            await asyncio.sleep(0.05)
            continue
        session = election.session
        assert session is not None
        emit(ev="gain", token=leader.token, deadline_in=session.remaining())
        while election.is_leader:
            sent = time.time()
            body = json.dumps({"id": identity, "token": leader.token, "sent": sent})
            try:
                await wait_for(
                    guard.write(leader.token, body.encode()), max(0.05, session.remaining())
                )
            except StaleToken:
                emit(ev="stale", token=leader.token)
            except Exception:
                pass
            await asyncio.sleep(0.02)
        emit(ev="loss", token=leader.token)
        with contextlib.suppress(Exception):
            await wait_for(election.resign(), ttl)


if __name__ == "__main__":
    url, name, identity, ttl, log_path = sys.argv[1:6]
    asyncio.run(main(url, name, identity, float(ttl), log_path))
