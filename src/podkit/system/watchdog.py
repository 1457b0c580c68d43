"""The orphan guard run by `podkit up`: `python -m podkit.system.watchdog PARENT_PID GRACE`.

It reads `+PGID` / `-PGID` lines on stdin. When stdin closes without `exit` (the parent
died), it sends SIGTERM to every group still registered, then SIGKILL after GRACE seconds.
"""

from __future__ import annotations

import signal
import sys
import time

from podkit.proc import signal_group


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grace = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    groups: set[int] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip().decode()
        if line == "exit":
            groups.clear()
            break
        if line[:1] == "+":
            groups.add(int(line[1:]))
        elif line[:1] == "-":
            groups.discard(int(line[1:]))
    if not groups:
        return
    alive = {g for g in groups if signal_group(g, signal.SIGTERM)}
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = {g for g in alive if signal_group(g, 0)}
    for g in alive:
        signal_group(g, signal.SIGKILL)


if __name__ == "__main__":
    main()
