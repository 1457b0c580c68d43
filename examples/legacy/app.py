"""A legacy app that only speaks plain HTTP, on its pod's own address and keeps its own counters at
/stats (JSON). The TLS sidecar makes it HTTPS; the metrics adapter makes /stats Prometheus."""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT = sys.argv[1], int(sys.argv[2])
POD = os.environ.get("POD_NAME", "legacy")
STARTED = time.time()
counts = {"GET": 0, "POST": 0}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        if self.path == "/stats":
            with lock:
                data = {"uptime": time.time() - STARTED, "requests": dict(counts)}
            return self.answer(data)
        with lock:
            counts["GET"] += 1
        self.answer({"pod": POD, "path": self.path,
                     "seen_as": self.headers.get("X-Forwarded-Proto", "http")})  # fmt: skip

    def answer(self, data: object) -> None:
        body = (json.dumps(data) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


print(f"{POD}: plain HTTP on {HOST}:{PORT}", flush=True)
ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
