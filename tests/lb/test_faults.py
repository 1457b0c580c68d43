"""Faults with real replica processes behind `podkit lb` under load: kill -9, a rolling
restart, a slow replica. The figures measured are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from lbkit import admin_json, balancer

from podkit.lb.features import Features
from podkit.lb.members import write_members
from support import free_port

pytestmark = pytest.mark.timeout(60)
REPLICA = Path(__file__).with_name("replica.py")


def start_replica(port: int, name: str, delay: float = 0.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(REPLICA), "127.0.0.1", str(port), name, str(delay)]
    )


async def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"replica on {port} did not start"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def replicas(
    n: int, delays: dict[int, float] | None = None
) -> AsyncIterator[tuple[list[int], list[subprocess.Popen[bytes]]]]:
    ports = [free_port() for _ in range(n)]
    procs = [start_replica(p, f"r{i}", (delays or {}).get(i, 0.0)) for i, p in enumerate(ports)]
    try:
        for p in ports:
            await wait_listening(p)
        yield ports, procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


class Load:
    """`n` clients sending GETs in a loop; counts answers by body, failures by kind."""

    def __init__(self, url: str, n: int = 16) -> None:
        self.url = url
        self.n = n
        self.results: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def _client(self) -> None:
        assert self._session is not None
        while not self._stop.is_set():
            try:
                async with self._session.get(self.url) as resp:
                    body = await resp.text()
                    if resp.status == 200:
                        self.results[body] += 1
                    else:
                        self.failures.append(f"{resp.status} {body.strip()}")
            except aiohttp.ClientError as exc:
                self.failures.append(repr(exc))

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.n)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert self._session is not None
        await self._session.close()


async def test_kill_9_of_a_replica_under_load_fails_no_get_and_ejects_it_within_1s() -> None:
    feats = Features(passive_health=True, admin_port=0)
    async with replicas(3) as (ports, procs):
        ups = [f"127.0.0.1:{p}" for p in ports]
        async with balancer(feats, ups) as (lb, w):
            assert w.admin is not None
            async with Load(f"http://127.0.0.1:{lb.port}/") as load:
                await asyncio.sleep(0.5)
                procs[1].kill()  # kill -9 in the middle of the load
                killed = time.monotonic()
                while True:
                    status = await admin_json(w.admin.port, "/status")
                    state = {u["name"]: u["state"] for u in status["upstreams"]}
                    if state[ups[1]] == "ejected":
                        break
                    assert time.monotonic() - killed < 1.0, state
                    await asyncio.sleep(0.005)
                ejected_after = time.monotonic() - killed
                await asyncio.sleep(0.1)  # answers r1 sent before it died are still read
                before = load.results["r1"]
                await asyncio.sleep(1.0)
                assert load.results["r1"] == before  # no traffic once ejected
        print(f"\nkill -9: ejected after {ejected_after * 1000:.0f} ms; {load.results}")
        assert ejected_after < 1.0
        assert load.failures == []
        assert load.results["r0"] > 50 and load.results["r2"] > 50


async def test_rolling_restart_of_every_replica_fails_no_request(tmp_path: Path) -> None:
    members = tmp_path / "members"
    feats = Features(passive_health=True, members_file=str(members), members_interval=0.05)
    async with replicas(3) as (ports, procs):
        ups = [f"127.0.0.1:{p}" for p in ports]
        write_members(members, ups)
        async with (
            balancer(feats, []) as (lb, _),
            Load(f"http://127.0.0.1:{lb.port}/") as load,
        ):
            await asyncio.sleep(0.3)
            for i, port in enumerate(ports):
                write_members(members, [u for u in ups if u != ups[i]])  # not ready: out
                while any(u.port == port for u in lb.upstreams):
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # drained: in-flight requests finish
                procs[i].terminate()
                procs[i].wait()
                procs[i] = start_replica(port, f"r{i}")  # restarted
                await wait_listening(port)
                served = load.results[f"r{i}"]
                write_members(members, ups)  # ready again: back in
                while load.results[f"r{i}"] == served:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
        print(f"\nrolling restart: {sum(load.results.values())} requests, {load.results}")
        assert load.failures == []
        assert all(load.results[f"r{i}"] > 20 for i in range(3))


async def test_a_slow_replica_loses_traffic_under_least_requests() -> None:
    async with replicas(3, delays={2: 0.25}) as (ports, _):
        ups = [f"127.0.0.1:{p}" for p in ports]
        async with (
            balancer(Features(), ups, policy_name="least-requests") as (lb, _),
            Load(f"http://127.0.0.1:{lb.port}/") as load,
        ):
            await asyncio.sleep(1.5)
        total = sum(load.results.values())
        share = load.results["r2"] / total
        print(f"\nslow replica (250 ms): {share:.1%} of {total} requests; {load.results}")
        assert load.failures == []
        assert share < 0.15  # well below 1/3
