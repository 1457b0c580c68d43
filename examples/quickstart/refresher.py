"""A sidecar: keeps a file in the pod's shared volume fresh, without touching the app."""

import os
import signal
import sys
import time
from pathlib import Path

target = Path(os.environ["VOLUME_CONTENT"]) / "message.txt"
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
n = 0
while True:
    n += 1
    tmp = target.with_suffix(".tmp")
    tmp.write_text(f"hello from {os.environ['POD_NAME']}, refresh #{n} at {time.strftime('%X')}\n")
    tmp.replace(target)  # atomic: the app never reads half a file
    time.sleep(1)
