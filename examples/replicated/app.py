"""A catalogue service: /products is cacheable for 10 s, /cart is per user and never
cached, /healthz answers the balancer's checks. Every answer names the replica."""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT = sys.argv[1], int(sys.argv[2])
POD = os.environ.get("POD_NAME", "app")
PRODUCTS = [{"id": i, "name": f"product {i}", "price": 10 + i} for i in range(1, 6)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the head and the body are two writes

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.answer(200, {"ok": True}, "no-store")
        elif self.path == "/products":
            time.sleep(0.05)  # a slow query: the cache in front saves it
            self.answer(200, {"pod": POD, "at": time.time(), "products": PRODUCTS}, "max-age=10")
        elif self.path == "/cart":
            self.answer(200, {"pod": POD, "user": self.headers.get("X-User"), "items": []},
                        "private, no-store")  # fmt: skip
        else:
            self.answer(404, {"error": f"no {self.path}"}, "no-store")

    def answer(self, status: int, data: object, cache: str) -> None:
        body = (json.dumps(data) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", cache)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


print(f"{POD} listening on http://{HOST}:{PORT}", flush=True)
ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
