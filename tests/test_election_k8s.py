"""Leader election on Kubernetes Leases, against a FAKE API server (tests/fake_kube_api.py)
that implements the Lease endpoints with resourceVersion conflicts (409)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from fake_kube_api import FakeKubeAPI
from podkit.election.k8s import KubeLeaseElection
from support import free_port, http_get


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    server = FakeKubeAPI().start()
    yield server
    server.stop()


@pytest.fixture
async def clients(api: FakeKubeAPI) -> AsyncIterator[list[AsyncClient]]:
    config = KubeConfig.from_dict(
        {
            "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "test"}}],
            "current-context": "fake",
        }
    )
    made = [AsyncClient(config, namespace="jobs") for _ in range(3)]
    yield made
    for c in made:
        await c.close()


async def test_the_fake_api_rejects_a_stale_resource_version(clients: list[AsyncClient]) -> None:
    a, b = clients[0], clients[1]
    await a.create(Lease(metadata=ObjectMeta(name="x"), spec=LeaseSpec(holderIdentity="a")))
    mine = await a.get(Lease, "x")
    theirs = await b.get(Lease, "x")
    assert mine.spec is not None and theirs.spec is not None
    mine.spec.holderIdentity = "a2"
    await a.replace(mine)
    theirs.spec.holderIdentity = "b"
    with pytest.raises(ApiError) as info:
        await b.replace(theirs)
    assert info.value.status.code == 409


async def test_one_leader_failover_and_tokens(api: FakeKubeAPI, clients: list[AsyncClient]) -> None:
    elections = [
        KubeLeaseElection(c, "cron", f"pod-{i}", namespace="jobs", lease_duration=1,
                          retry_period=0.1)
        for i, c in enumerate(clients)
    ]  # fmt: skip
    tasks = [asyncio.create_task(e.campaign()) for e in elections]
    done, pending = await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    first = next(iter(done)).result()
    leader = next(e for e in elections if e.identity == first.identity)
    await asyncio.sleep(1.5)  # renewals keep it; nobody else takes over
    assert leader.is_leader and all(not t.done() for t in pending)
    stored = api.leases["jobs", "cron"]["spec"]
    assert stored["holderIdentity"] == first.identity and stored["leaseDurationSeconds"] == 1
    current = await elections[0].current_leader()
    assert current is not None and current.identity == first.identity
    # the leader dies (stops renewing without releasing)
    assert leader._renewer is not None
    leader._renewer.cancel()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    done2, _ = await asyncio.wait(pending, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    took = loop.time() - t0
    assert len(done2) == 1
    second = next(iter(done2)).result()
    assert second.identity != first.identity and second.token == first.token + 1
    assert took < 1 + 0.5, f"took over after {took:.2f}s"
    # resigning hands over at once
    new_leader = next(e for e in elections if e.identity == second.identity)
    last = [t for t in pending if t not in done2]
    t1 = loop.time()
    await new_leader.resign()
    (third_task,) = last
    third = await asyncio.wait_for(third_task, 3)
    assert loop.time() - t1 < 0.5 and third.token == second.token + 1
    for e in elections:
        await e.resign()


async def test_holder_steps_down_when_the_api_is_unreachable(
    api: FakeKubeAPI, clients: list[AsyncClient]
) -> None:
    e = KubeLeaseElection(clients[0], "solo", "pod-0", namespace="jobs", lease_duration=2)
    await e.campaign(timeout=3)
    assert e.is_leader
    api.down = True
    await asyncio.wait_for(e.lost.wait(), 3)
    assert not e.is_leader
    api.down = False


def test_elector_component_on_a_kubernetes_lease(api: FakeKubeAPI, tmp_path: Path) -> None:
    """`podkit elect --backend k8s://jobs` with a kubeconfig pointing at the fake API."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "test"}}],
                "current-context": "fake",
            }
        )
    )
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "podkit", "elect", "--backend", "k8s://jobs", "--name", "cron",
             "--identity", f"pod-{i}", "--ttl", "1", "--port", str(port)],
            env=env, stderr=subprocess.DEVNULL,
        )
        for i, port in enumerate(ports)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        leader: dict[str, object] = {}
        while not leader:
            assert time.monotonic() < deadline, "no leader"
            with contextlib.suppress(OSError):
                code, body = http_get(f"http://127.0.0.1:{ports[0]}/leader", timeout=1)
                if code == 200:
                    leader = json.loads(body)
            time.sleep(0.05)
        assert leader["identity"] in ("pod-0", "pod-1") and leader["token"] == 1
        assert api.leases["jobs", "cron"]["spec"]["holderIdentity"] == leader["identity"]
        me = []
        for p in ports:  # the other elector may still be starting on a slow machine
            while True:
                assert time.monotonic() < deadline, f"the elector on port {p} never answered"
                try:
                    me.append(json.loads(http_get(f"http://127.0.0.1:{p}/me", timeout=1)[1]))
                    break
                except OSError:
                    time.sleep(0.05)
        assert sorted(m["leader"] for m in me) == [False, True]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=10)
