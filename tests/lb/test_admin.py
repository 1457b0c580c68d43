"""The admin port (/metrics, /status, /purge) and the `podkit lb` command with its flags."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from lbkit import admin_json, backends, balancer, request
from prometheus_client.parser import text_string_to_metric_families

from podkit.lb.features import Features
from podkit.lb.members import write_members
from support import free_port, free_ports

pytestmark = pytest.mark.timeout(60)


async def scrape(
    port: int, target: str = "/metrics"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    ans = await request(port, target)
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
        assert m3[("podkit_lb_retries_unbudgeted_total", ())] == 0
        status = await admin_json(port, "/status")
        assert status["retries_unbudgeted"] == 0
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
    out = run("--upstream", "x:1", "--connect-timeout", "0")
    assert out.returncode == 2 and "--connect-timeout 0.0: must be > 0" in out.stderr
    out = run("--upstream", "x:1", "--body-timeout", "0")
    assert out.returncode == 2 and "--body-timeout 0.0: must be > 0" in out.stderr
    out = run("--upstream", "x:1", "--request-timeout", "-1")
    assert out.returncode == 2 and "--request-timeout -1.0: must be >= 0" in out.stderr
    out = run("--upstream", "x:1", "--retry-budget", "150")
    assert out.returncode == 2 and "--retry-budget 150.0: a percent" in out.stderr
    out = run("--members-dns", "nameonly")
    assert out.returncode == 2 and "NAME:PORT" in out.stderr
    out = run("--upstream", "x:1", "--tls-cert", "/nope/c.pem", "--tls-key", "/nope/k.pem")
    assert out.returncode == 2
    assert "--tls-cert, --tls-key: /nope/c.pem: No such file" in out.stderr


def test_a_port_in_use_is_refused_not_shared() -> None:
    """A second balancer on a port the first holds must fail, though both would allow
    SO_REUSEPORT; so must an admin port in use. Neither says it is listening."""
    port = free_port()
    first = subprocess.Popen(
        [sys.executable, "-m", "podkit", "lb", "--listen", f"127.0.0.1:{port}",
         "--upstream", "127.0.0.1:9"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert first.stderr is not None
        assert "listening on" in first.stderr.readline()
        for cmd in (
            ["lb", "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:10"],
            ["lb", "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:10", "--workers", "2"],
            ["sidecar", "tls", "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:10",
             "--self-signed"],
            ["lb", "--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.1:10",
             "--admin-port", str(port)],
        ):  # fmt: skip
            out = subprocess.run(
                [sys.executable, "-m", "podkit", *cmd], capture_output=True, text=True, timeout=30
            )
            assert out.returncode == 1, (cmd, out.stderr)
            flag = " (--admin-port)" if "--admin-port" in cmd else " (--listen)"
            assert f"cannot listen on 127.0.0.1:{port}{flag}: Address already in use" in out.stderr
            assert "listening on" not in out.stderr and "Traceback" not in out.stderr
    finally:
        first.terminate()
        first.wait(timeout=10)


@asynccontextmanager
async def two_workers(upstream: str, *flags: str) -> AsyncIterator[tuple[int, int]]:
    """`podkit lb --workers 2 FLAGS` with admin ports P and P+1: (port, P) once both answer;
    it must exit 0 on SIGTERM."""
    port, admin = free_port(), free_ports(2)
    cmd = [
        sys.executable, "-m", "podkit", "lb", "--listen", f"127.0.0.1:{port}",
        "--upstream", upstream, "--workers", "2", "--admin-port", str(admin), *flags,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                await admin_json(admin, "/status")
                await admin_json(admin + 1, "/status")
                break
            except (OSError, AssertionError):
                assert time.monotonic() < deadline, "podkit lb did not start"
                await asyncio.sleep(0.1)
        yield port, admin
    finally:
        proc.terminate()
        _, err = await asyncio.to_thread(proc.communicate, timeout=10)
    assert proc.returncode == 0, err.decode()


async def upstream_states(admin: int, worker: int) -> dict[str, str]:
    status = await admin_json(admin + worker, "/status")
    return {u["name"]: u["state"] for u in status["upstreams"]}


async def test_workers_share_host_health() -> None:
    """With 2 workers, each upstream is checked by one of them, and what one worker
    learns (a failed check, an ejection) holds in the other within a tick."""
    async with backends(2) as bs:
        b0, b1 = (b.url.removeprefix("http://") for b in bs)
        flags = ["--upstream", bs[1].url, "--health-path", "/healthz", "--health-interval",
                 "0.2", "--unhealthy-threshold", "2", "--consecutive-5xx", "3"]  # fmt: skip
        async with two_workers(bs[0].url, *flags) as (port, admin):
            before = [b.hits["/healthz"] for b in bs]
            await asyncio.sleep(2.0)
            checks = [b.hits["/healthz"] - n for b, n in zip(bs, before, strict=True)]
            # one checker each: about 10 checks in 2 s, where two would make about 20
            print(f"2 workers, --health-interval 0.2: checks per backend in 2 s: {checks}")
            assert all(5 <= c <= 14 for c in checks), checks
            # a failed check by the one worker that checks b0 takes it out in both
            bs[0].healthy = False
            await until_states(admin, {b0: "unhealthy", b1: "healthy"}, within=2.0)
            bs[0].healthy = True
            await until_states(admin, {b0: "healthy", b1: "healthy"}, within=2.0)
            # passive: 5xx seen by one worker (one keep-alive connection) ejects b1 in both
            bs[1].failing = True
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
                for _ in range(20):
                    async with s.get(f"http://127.0.0.1:{port}/x") as resp:
                        await resp.read()
                    states = [await upstream_states(admin, w) for w in (0, 1)]
                    if any(st[b1] == "ejected" for st in states):
                        break
            await until_states(admin, {b0: "healthy", b1: "ejected"}, within=1.0)


async def until_states(admin: int, want: dict[str, str], within: float) -> None:
    """Wait until both workers' /status show the upstreams in these states."""
    deadline = time.monotonic() + within
    while True:
        seen = [await upstream_states(admin, w) for w in (0, 1)]
        if all(s == want for s in seen):
            return
        assert time.monotonic() < deadline, f"workers saw {seen}, not {want}"
        await asyncio.sleep(0.05)


async def test_any_workers_admin_port_answers_for_every_worker() -> None:
    """With 2 workers, /metrics on one admin port has both workers' samples (labelled),
    and /purge empties both workers' caches."""
    async with (
        backends(1) as bs,
        two_workers(bs[0].url, "--cache-bytes", "1000000") as (port, admin),
    ):
        sent = 0
        while True:  # fresh connections until each worker has cached /cached
            assert (await request(port, "/cached")).status == 200
            sent += 1
            entries = [(await admin_json(admin + i, "/status"))["cache"]["entries"] for i in (0, 1)]
            if min(entries) >= 1:
                break
            assert sent < 200, f"the kernel gave every connection to one worker: {entries}"
        both = await scrape(admin + 1)
        assert both[("podkit_lb_admin_worker_up", (("worker", "0"),))] == 1
        assert both[("podkit_lb_admin_worker_up", (("worker", "1"),))] == 1
        lookups = sum(
            v
            for (name, _), v in both.items()
            if name in ("podkit_lb_cache_hits_total", "podkit_lb_cache_misses_total")
        )
        assert lookups == sent
        assert {dict(labels).get("worker") for (_, labels) in both} == {"0", "1"}
        alone = await scrape(admin, "/metrics?local=1")
        assert all("worker" not in dict(labels) for (_, labels) in alone)
        assert (
            sum(v for (name, _), v in alone.items() if name == "podkit_lb_cache_misses_total")
            == both[("podkit_lb_cache_misses_total", (("worker", "0"),))]
        )
        ans = await request(admin + 1, f"/purge?url=127.0.0.1:{port}/cached", method="POST")
        assert ans.status == 200, ans
        assert json.loads(ans.body) == {"purged": 2, "workers": 2}
        for i in (0, 1):
            assert (await admin_json(admin + i, "/status"))["cache"]["entries"] == 0


async def test_a_silent_worker_is_named_by_purge_and_metrics() -> None:
    feats = Features(cache_bytes=1 << 20, admin_port=0)
    async with backends(1) as bs, balancer(feats, [bs[0].url]) as (lb, w):
        assert w.admin is not None
        dead = free_port()
        w.admin.siblings = {1: dead}
        await request(lb.port, "/cached")
        ans = await request(w.admin.port, f"/purge?url=127.0.0.1:{lb.port}/cached")
        assert ans.status == 502
        doc = json.loads(ans.body)
        assert doc["purged"] == 1 and doc["workers"] == 2
        assert len(doc["failed"]) == 1 and f"worker 1 (port {dead})" in doc["failed"][0]
        m = await scrape(w.admin.port)
        assert m[("podkit_lb_admin_worker_up", (("worker", "0"),))] == 1
        assert m[("podkit_lb_admin_worker_up", (("worker", "1"),))] == 0
        assert m[("podkit_lb_cache_misses_total", (("worker", "0"),))] == 1


async def test_a_worker_with_unreadable_metrics_adds_none_of_them() -> None:
    """A sibling whose exposition breaks halfway counts as down, with none of its samples
    (not the ones before the break)."""

    async def sibling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfoo_total 1\nbar{ 2\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(sibling, "127.0.0.1", 0)
    feats = Features(admin_port=0)
    try:
        async with backends(1) as bs, balancer(feats, [bs[0].url]) as (_, w):
            assert w.admin is not None
            w.admin.siblings = {1: server.sockets[0].getsockname()[1]}
            m = await scrape(w.admin.port)
    finally:
        server.close()
    assert m[("podkit_lb_admin_worker_up", (("worker", "1"),))] == 0
    assert not [
        k for k in m if dict(k[1]).get("worker") == "1" and k[0] != "podkit_lb_admin_worker_up"
    ]
    assert m[("podkit_lb_admin_worker_up", (("worker", "0"),))] == 1


async def test_a_rate_limit_holds_for_all_workers_together() -> None:
    """`--workers 2 --rate-limit 20/s burst 20`: the client gets 20 (plus the refill) in
    all, not 20 from each worker, though its connections reach both."""
    async with (
        backends(1) as bs,
        two_workers(bs[0].url, "--rate-limit", "20/s burst 20") as (port, admin),
    ):
        started = time.monotonic()
        codes = [(await request(port, "/x")).status for _ in range(80)]  # fresh connections
        elapsed = time.monotonic() - started
        admitted = codes.count(200)
        assert codes.count(429) == 80 - admitted
        assert 20 <= admitted <= 20 + 20 * elapsed + 1, (admitted, elapsed)
        print(f"2 workers, 20/s burst 20: {admitted} of 80 admitted in {elapsed:.2f} s")
        m = await scrape(admin)
        seen = {
            dict(labels)["worker"]: v
            for (name, labels), v in m.items()
            if name == "podkit_lb_rate_limited_total"
        }
        assert set(seen) == {"0", "1"} and sum(seen.values()) == 80 - admitted
        per_worker = [(await admin_json(admin + i, "/status"))["requests"] for i in (0, 1)]
        assert sum(per_worker) == admitted
        # both workers answered: each limited some, or admitted some
        assert all(seen[str(i)] + per_worker[i] > 0 for i in (0, 1)), (seen, per_worker)


async def test_a_scraper_keeps_one_connection_and_readyz_follows_the_upstreams() -> None:
    """One kept-alive connection serves GET and HEAD /metrics, /status, a POST /purge and
    /readyz in turn; /readyz is 503 while no upstream takes requests."""
    feats = Features(cache_bytes=1 << 20, admin_port=0)
    async with backends(1) as bs, balancer(feats, [bs[0].url]) as (lb, w):
        assert w.admin is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", w.admin.port)

        async def ask(method: str, target: str) -> tuple[int, dict[str, str], bytes]:
            writer.write(f"{method} {target} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            status, *lines = head.decode("latin-1").split("\r\n")[:-2]
            hdrs = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
            size = 0 if method == "HEAD" else int(hdrs["content-length"])
            return int(status.split(" ")[1]), hdrs, await reader.readexactly(size)

        try:
            code, hdrs, body = await ask("GET", "/metrics")
            assert code == 200 and hdrs["content-type"].startswith("text/plain; version=0.0.4")
            assert b"podkit_lb_upstream_available" in body
            code, hdrs, _ = await ask("HEAD", "/metrics")
            assert code == 200 and int(hdrs["content-length"]) > 0
            code, _, body = await ask("GET", "/status")
            assert code == 200 and json.loads(body)["upstreams"][0]["state"] == "healthy"
            code, _, body = await ask("POST", f"/purge?url=127.0.0.1:{lb.port}/cached")
            assert (code, json.loads(body)) == (200, {"purged": 0})
            assert (await ask("GET", "/readyz"))[::2] == (200, b'{"ok": true}')
            for u in lb.upstreams:
                u.available = False
            assert (await ask("GET", "/readyz"))[::2] == (503, b'{"ok": false}')
            code, hdrs, _ = await ask("DELETE", "/purge?url=x")
            assert code == 405 and hdrs["allow"] == "GET, POST"
        finally:
            writer.close()


async def test_the_siblings_are_asked_on_kept_alive_connections() -> None:
    """Scrapes of every worker's metrics reuse one connection to each sibling."""
    connections = []

    async def sibling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        body = b"# TYPE podkit_lb_retries counter\npodkit_lb_retries_total 3.0\n"
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))

    server = await asyncio.start_server(sibling, "127.0.0.1", 0)
    try:
        async with backends(1) as bs, balancer(Features(admin_port=0), [bs[0].url]) as (_, w):
            assert w.admin is not None
            w.admin.siblings = {1: server.sockets[0].getsockname()[1]}
            for _ in range(3):
                m = await scrape(w.admin.port)
                assert m[("podkit_lb_retries_total", (("worker", "1"),))] == 3.0
                assert m[("podkit_lb_admin_worker_up", (("worker", "1"),))] == 1
    finally:
        server.close()
    assert len(connections) == 1
