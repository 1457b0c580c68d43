"""Test sidecar: records start and SIGTERM to $EVENTS, then exits after TERM_DELAY."""

import os
import signal
import time

pod = os.environ.get("POD_NAME", "?")
label = os.environ.get("LABEL", "side")
events = os.environ["EVENTS"]


def record(what: str) -> None:
    with open(events, "a") as f:
        f.write(f"{time.time():.6f} {pod} {label} {what} {os.getpid()}\n")


def on_term(*_: object) -> None:
    record("sigterm")
    time.sleep(float(os.environ.get("TERM_DELAY", "0")))
    record("exit")
    raise SystemExit(0)


signal.signal(signal.SIGTERM, on_term)
record("start")
while True:
    time.sleep(0.1)
