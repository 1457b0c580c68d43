"""Test replica: HTTP/1.1 keep-alive on HOST:PORT answering NAME after DELAY seconds.

    python replica.py HOST PORT NAME [DELAY]

`/healthz` answers 503 while the file named by $UNHEALTHY exists, else 200.
"""

import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
unhealthy = os.environ.get("UNHEALTHY", "")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        code, body = 200, name.encode()
        if self.path == "/healthz":
            if unhealthy and os.path.exists(unhealthy):
                code = 503
        elif delay:
            time.sleep(delay)
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


Server((host, port), Handler).serve_forever()
