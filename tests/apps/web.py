"""Test app: HTTP on $(POD_IP):PORT answering its pod name; records SIGTERM to $EVENTS.

Env: UNREADY_REPLICAS (comma list) answer 503 on /ready; TERM_DELAY seconds to linger
after SIGTERM; IGNORE_TERM=1 ignores SIGTERM; CHILD=1 starts a grandchild `sleep`.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

host, port = sys.argv[1], int(sys.argv[2])
label = os.environ.get("LABEL", "web")
pod = os.environ.get("POD_NAME", "?")
unready = set(filter(None, os.environ.get("UNREADY_REPLICAS", "").split(",")))
events = os.environ.get("EVENTS")


def record(what: str) -> None:
    if events:
        with open(events, "a") as f:
            f.write(f"{time.time():.6f} {pod} {label} {what} {os.getpid()}\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        code, body = 200, pod.encode()
        if self.path == "/ready" and os.environ.get("REPLICA") in unready:
            code = 503
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def on_term(*_: object) -> None:
    record("sigterm")
    if os.environ.get("IGNORE_TERM") == "1":
        return
    delay = float(os.environ.get("TERM_DELAY", "0"))

    def finish() -> None:
        time.sleep(delay)
        record("exit")
        os._exit(0)

    threading.Thread(target=finish, daemon=True).start()


signal.signal(signal.SIGTERM, on_term)
if os.environ.get("CHILD") == "1":
    child = subprocess.Popen(["sleep", "1000"])
    record(f"child {child.pid}")
server = ThreadingHTTPServer((host, port), Handler)
record("start")
server.serve_forever()
