"""The singleton job: only the leader runs it. Every second it appends a line to a
shared report, passing its fencing token so a late write from an old leader is refused."""

import asyncio
import os
import signal
import sys

from podkit.backends import open_kv
from podkit.election import FencedResource, StaleToken

TOKEN = int(os.environ["PODKIT_LEADER_TOKEN"])
POD = os.environ.get("POD_NAME", "?")


async def main() -> None:
    kv = await open_kv(os.environ["PODKIT_BACKEND_STATE"])
    report = FencedResource(kv, "leader-example/report")
    n = 0
    while True:
        n += 1
        try:
            await report.write(TOKEN, f"{POD} (token {TOKEN}) tick {n}".encode())
        except StaleToken as exc:
            print(f"refused: {exc}", flush=True)
            sys.exit(1)
        print(f"{POD} leads with token {TOKEN}: tick {n}", flush=True)
        await asyncio.sleep(1)


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
asyncio.run(main())
