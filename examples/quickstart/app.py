"""A tiny HTTP app: answers with its pod name and the page its sidecar keeps fresh."""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST, PORT = sys.argv[1], int(sys.argv[2])
CONTENT = Path(os.environ.get("VOLUME_CONTENT", ".")) / "message.txt"
POD = os.environ.get("POD_NAME", "app")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the head and the body are two writes

    def do_GET(self) -> None:
        if self.path == "/healthz":
            body = b"ok\n"
        else:
            try:
                message = CONTENT.read_text().strip()
            except OSError:
                message = "(the sidecar has not written the page yet)"
            body = (json.dumps({"pod": POD, "message": message}) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if self.path != "/healthz":
            print(f"{self.address_string()} {format % args}", flush=True)


print(f"{POD} listening on http://{HOST}:{PORT}", flush=True)
ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
