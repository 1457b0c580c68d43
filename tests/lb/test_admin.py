"""The admin port (/metrics, /status, /purge) and the `podkit lb` command with its flags."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lbkit import admin_json, backends, balancer, request
from prometheus_client.parser import text_string_to_metric_families

from podkit.lb.features import Features
from podkit.lb.members import write_members
from support import free_port

pytestmark = pytest.mark.timeout(60)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    ans = await request(port, "/metrics")
    assert ans.status == 200 and ans.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(ans.body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_move_as_requests_flow() -> None:
    feats = Features(
        cache_bytes=1 << 20,
        rate_limit="1/s burst 20",
        rate_limit_by="header:X-Key",
        max_requests=1,
        passive_health=True,
        admin_port=0,
    )
    async with backends(2) as bs, balancer(feats, [b.url for b in bs]) as (lb, w):
        assert w.admin is not None
        port = w.admin.port
        names = [u.name for u in lb.upstreams]
        m0 = await scrape(port)
        assert m0[("podkit_lb_upstream_available", (("upstream", names[0]),))] == 1.0
        for _ in range(4):
            assert (await request(lb.port, "/x")).status == 200
        m1 = await scrape(port)
        for n in names:
            key = (("code", "2xx"), ("upstream", n))
            assert (
                m1[("podkit_lb_requests_total", key)] - m0.get(("podkit_lb_requests_total", key), 0)
                == 2
            )
            assert m1[("podkit_lb_upstream_latency_seconds_count", (("upstream", n),))] == 2
        bs[0].failing = True
        codes = {(await request(lb.port, "/x")).status for _ in range(2)}
        assert codes == {200, 500}
        m2 = await scrape(port)
        assert m2[("podkit_lb_requests_total", (("code", "5xx"), ("upstream", names[0])))] == 1
        bs[0].failing = False
        # cache: a miss then a hit
        await request(lb.port, "/cached")
        await request(lb.port, "/cached")
        # rate limit: the 21st request of one key
        for _ in range(21):
            await request(lb.port, "/x", headers={"X-Key": "k"})
        # breaker: three slow requests at once, one request in flight per upstream allowed
        slow = [request(lb.port, f"/slow?s=0.3&i={i}") for i in range(3)]  # distinct URLs
        assert sorted(a.status for a in await asyncio.gather(*slow)) == [200, 200, 503]
        m3 = await scrape(port)
        assert m3[("podkit_lb_cache_hits_total", ())] == 1
        assert m3[("podkit_lb_cache_misses_total", ())] >= 1
        assert 0 < m3[("podkit_lb_cache_hit_ratio", ())] < 1
        assert m3[("podkit_lb_rate_limited_total", ())] == 1
        overflows = sum(
            v for (name, _), v in m3.items() if name == "podkit_lb_breaker_overflows_total"
        )
        assert overflows >= 1
        assert ("podkit_lb_retries_total", ()) in m3
        status = await admin_json(port, "/status")
        assert {u["name"] for u in status["upstreams"]} == set(names)
        assert status["cache"]["hits"] == 1 and status["rate_limited"] == 1
        assert status["config"]["features"]["max_requests"] == 1
        assert (await request(port, "/nope")).status == 404
        assert (await request(port, "/metrics", method="POST")).status == 405


async def test_podkit_lb_command_with_members_cache_limit_and_admin(tmp_path: Path) -> None:
    members = tmp_path / "members"
    async with backends(2) as bs:
        write_members(members, [bs[0].url])
        port, admin = free_port(), free_port()
        cmd = [
            sys.executable, "-m", "podkit", "lb", "--listen", f"127.0.0.1:{port}",
            "--members-file", str(members), "--cache-bytes", "1000000",
            "--rate-limit", "50/s burst 50", "--rate-limit-by", "ip",
            "--health-path", "/healthz", "--health-interval", "0.2",
            "--healthy-threshold", "1", "--unhealthy-threshold", "2",
            "--max-requests", "100", "--admin-port", str(admin), "--self-signed",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        import ssl

        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    ans = await request(port, "/cached", tls=tls)
                    if ans.status == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "podkit lb did not start"
                await asyncio.sleep(0.1)
            assert (await request(port, "/cached", tls=tls)).headers["x-cache"] == "HIT"
            write_members(members, [bs[0].url, bs[1].url])
            deadline = time.monotonic() + 5
            while True:
                status = await admin_json(admin, "/status")
                if [u["state"] for u in status["upstreams"]] == ["healthy", "healthy"]:
                    break
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.05)
            bodies = {(await request(port, "/x", tls=tls)).body[:2] for _ in range(4)}
            assert bodies == {b"b0", b"b1"}
            ans = await request(port, "/headers", tls=tls)
            assert json.loads(ans.body)["X-Forwarded-Proto"] == "https"
        finally:
            proc.terminate()
            _, err = await asyncio.to_thread(proc.communicate, timeout=10)
        assert proc.returncode == 0, err.decode()
        assert b"admin on http://127.0.0.1:" in err


def test_feature_flags_are_checked() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "podkit", "lb", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    out = run("--upstream", "x:1", "--rate-limit", "fast")
    assert out.returncode == 2 and "--rate-limit" in out.stderr
    out = run("--upstream", "x:1", "--tls-cert", "c.pem")
    assert out.returncode == 2 and "--tls-key" in out.stderr
    out = run("--listen", "127.0.0.1:1")
    assert out.returncode == 2 and "--members-" in out.stderr
    out = run("--members-dns", "nameonly")
    assert out.returncode == 2 and "NAME:PORT" in out.stderr
