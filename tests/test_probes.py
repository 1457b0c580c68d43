"""A probe that fails says why: the status, the refusal, the timeout, the exit code and
the tail of the output."""

from __future__ import annotations

import os

from podkit.system.probes import exec_check, http_check, tcp_check
from support import TinyHTTP, free_port


async def test_http_probe_reasons() -> None:
    server = TinyHTTP(lambda path: (503, b"busy") if path == "/ready" else (200, b"ok"))
    port = int(server.url.rsplit(":", 1)[1])
    try:
        assert await http_check("127.0.0.1", port, "/live", 1.0) == (True, "")
        assert await http_check("127.0.0.1", port, "/ready", 1.0) == (
            False, "GET /ready: HTTP 503")  # fmt: skip
    finally:
        server.close()
    closed = free_port()
    assert await http_check("127.0.0.1", closed, "/x", 1.0) == (
        False, f"GET http://127.0.0.1:{closed}/x: connection refused")  # fmt: skip


async def test_tcp_and_exec_probe_reasons() -> None:
    closed = free_port()
    assert await tcp_check("127.0.0.1", closed, 1.0) == (
        False, f"TCP 127.0.0.1:{closed}: connection refused")  # fmt: skip
    env = dict(os.environ)
    ok = await exec_check(["sh", "-c", "exit 0"], env, None, 2.0)
    assert ok == (True, "")
    failed = await exec_check(
        ["sh", "-c", "echo first; echo 'db not up' >&2; exit 3"], env, None, 2
    )
    assert failed == (False, "sh: exit 3: first\ndb not up")
    slow = await exec_check(["sleep", "5"], env, None, 0.2)
    assert slow == (False, "sleep: still running after 0.2s")
