"""The worker supervisor and a signal that comes while its workers start."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from support import free_port

# `serve` with two workers, as `podkit lb --workers 2` runs it; "ready" before the fork.
SERVE = """\
import sys
from podkit.net.proxy.config import proxy_config
from podkit.net.proxy.workers import serve
config = proxy_config(sys.argv[1], ["127.0.0.1:9"], workers=2)
sys.exit(serve(config, ready=lambda: print("ready", file=sys.stderr, flush=True)))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_group_while_the_workers_start_stops_them(sig: signal.Signals) -> None:
    """A terminal's Ctrl-C, or a supervisor's SIGTERM to the process group, may reach the
    workers before they have handlers of their own: they stop all the same, at once, and
    none runs the supervisor's handler."""
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, listen], stderr=subprocess.PIPE, start_new_session=True
    )
    assert proc.stderr is not None
    try:
        assert proc.stderr.readline() == b"ready\n"
        os.killpg(proc.pid, sig)  # the workers are being forked or are starting now
        _, err = proc.communicate(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
