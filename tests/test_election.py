"""Locks, sessions, leader election and fencing: unit tests on an injected clock, then
every KV driver on its real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from backends.conftest import KV_DRIVERS, make_url
from podkit.backends import KV, BackendUnavailable, open_kv
from podkit.clock import ManualClock
from podkit.election import (
    FencedResource,
    Leader,
    LeaderElection,
    LeadershipLost,
    Lock,
    Session,
    StaleToken,
    cas_update,
)


class FlakyKV:
    """Wraps a KV; while `down`, every call fails as an unreachable server would."""

    def __init__(self, inner: KV) -> None:
        self.inner = inner
        self.down = False
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr) or name == "watch":
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise BackendUnavailable(f"{self.url}: no answer (test)")
            return await attr(*args, **kwargs)

        return call


async def settle(clock: ManualClock, seconds: float, step: float = 0.05) -> None:
    for _ in range(round(seconds / step)):
        await clock.advance(step)


@pytest.fixture
async def mem() -> AsyncIterator[tuple[KV, ManualClock]]:
    import uuid

    clock = ManualClock(1000.0)
    kv = await open_kv(f"memory://election-{uuid.uuid4().hex}", clock=clock)
    yield kv, clock
    await kv.close()


async def test_session_renews_and_keeps_its_key(mem: tuple[KV, ManualClock]) -> None:
    kv, clock = mem
    session = await Session(kv, ttl=3, clock=clock).start()
    await kv.put("held", b"x", lease=session.lease)
    await settle(clock, 10)  # more than 3 TTLs
    assert session.valid
    assert await kv.get("held") is not None
    await session.close()
    assert not session.valid
    assert await kv.get("held") is None  # revoked on close


async def test_holder_steps_down_before_the_server_expires_it(
    mem: tuple[KV, ManualClock],
) -> None:
    inner, clock = mem
    kv = FlakyKV(inner)
    session = await Session(kv, ttl=4, clock=clock, margin=0.5).start()  # type: ignore[arg-type]
    await kv.put("held", b"x", lease=session.lease)
    await settle(clock, 2)  # a renewal happened at 1.33 s
    assert session.valid
    last_renewal_deadline = session.deadline
    kv.down = True  # the backend goes away
    lost_at = None
    for _ in range(200):
        await clock.advance(0.05)
        if session.lost.is_set() and lost_at is None:
            lost_at = clock.now()
            # the server still holds the key: the holder stopped first
            assert await inner.get("held") is not None
    assert lost_at is not None
    assert lost_at == pytest.approx(last_renewal_deadline, abs=0.06)
    assert await inner.get("held") is None  # later the server expired it too


async def test_session_ends_when_the_server_says_the_lease_is_gone(
    mem: tuple[KV, ManualClock],
) -> None:
    kv, clock = mem
    session = await Session(kv, ttl=2, clock=clock).start()
    await kv.revoke(session.lease)
    await settle(clock, 1)  # next keep-alive answers False
    assert session.lost.is_set() and not session.valid


async def test_lock_excludes_and_tokens_increase(mem: tuple[KV, ManualClock]) -> None:
    kv, _ = mem
    inside = 0
    tokens: list[int] = []

    async def worker() -> None:
        nonlocal inside
        async with Lock(kv, "report", ttl=30) as lock:
            inside += 1
            assert inside == 1
            tokens.append(lock.token)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(worker() for _ in range(8)))
    assert len(tokens) == 8 and tokens == sorted(tokens) and len(set(tokens)) == 8


async def test_lock_timeout_leaves_the_queue(mem: tuple[KV, ManualClock]) -> None:
    kv, _ = mem
    async with Lock(kv, "busy", ttl=30):
        with pytest.raises(TimeoutError):
            await Lock(kv, "busy", ttl=30).acquire(timeout=0.2)
        keys = await kv.range("podkit/election/lock/busy/")
        assert len(keys) == 1  # the waiter took its key away


async def test_fenced_resource_rejects_a_stale_token(mem: tuple[KV, ManualClock]) -> None:
    kv, _ = mem
    guard = FencedResource(kv, "resource/report")
    await guard.write(5, b"from leader 5")
    await guard.write(7, b"from leader 7")
    with pytest.raises(StaleToken, match="token 5 is older than 7"):
        await guard.write(5, b"late write from paused leader 5")
    assert await guard.read() == (7, b"from leader 7")
    await guard.write(7, b"leader 7 again")  # the same leader may write again


async def test_cas_update_survives_contention(mem: tuple[KV, ManualClock]) -> None:
    kv, _ = mem

    async def bump() -> None:
        await cas_update(kv, "counter", lambda old: str(int(old or b"0") + 1).encode())

    await asyncio.gather(*(bump() for _ in range(50)))
    entry = await kv.get("counter")
    assert entry is not None and entry.value == b"50"


async def test_election_callbacks_resign_and_changes(mem: tuple[KV, ManualClock]) -> None:
    kv, _ = mem
    events: list[tuple[str, str, int]] = []

    def make(identity: str) -> LeaderElection:
        return LeaderElection(
            kv,
            "scheduler",
            identity,
            ttl=30,
            on_gain=lambda led: events.append(("gain", led.identity, led.token)),
            on_loss=lambda led: events.append(("loss", led.identity, led.token)),
        )

    a, b = make("a"), make("b")
    observed: list[Leader | None] = []

    async def observe() -> None:
        async for leader in a.changes():
            observed.append(leader)
            if len(observed) == 4:
                return

    watcher = asyncio.create_task(observe())
    await asyncio.sleep(0.05)  # the observer sees "no leader" first
    led_a = await a.campaign()
    assert a.is_leader and a.token == led_a.token
    b_task = asyncio.create_task(b.campaign())
    await asyncio.sleep(0.1)
    assert not b_task.done()  # b queues behind a
    current = await b.current_leader()
    assert current is not None and current.identity == "a"
    await a.resign()
    led_b = await asyncio.wait_for(b_task, 2)
    assert led_b.token > led_a.token and b.is_leader and not a.is_leader
    await b.resign()
    await asyncio.wait_for(watcher, 2)
    assert [x.identity if x else None for x in observed] == [None, "a", "b", None]
    assert events == [
        ("gain", "a", led_a.token),
        ("loss", "a", led_a.token),
        ("gain", "b", led_b.token),
        ("loss", "b", led_b.token),
    ]


async def test_campaign_fails_when_the_session_is_lost(mem: tuple[KV, ManualClock]) -> None:
    kv, clock = mem
    holder = LeaderElection(kv, "x", "holder", ttl=30)
    await holder.campaign()
    flaky = FlakyKV(kv)
    waiter = LeaderElection(flaky, "x", "waiter", ttl=2, clock=clock)  # type: ignore[arg-type]
    task = asyncio.create_task(waiter.campaign())
    await asyncio.sleep(0.1)
    flaky.down = True
    await settle(clock, 3)
    with pytest.raises(LeadershipLost):
        await asyncio.wait_for(task, 2)
    await holder.resign()


# --------------------------------------------------------------- every driver


@pytest.fixture(params=KV_DRIVERS)
async def real_kv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    yield make_url(request.param, request, tmp_path)


async def test_failover_on_every_driver(real_kv: str) -> None:
    """Three candidates; the leader crashes (stops renewing without resigning): a new
    leader with a larger token takes over within TTL + 1 s, and the crashed leader's
    late write is rejected by the fenced resource."""
    ttl = 1.0
    kvs = [await open_kv(real_kv) for _ in range(3)]
    elections = [LeaderElection(kv, "failover", f"c{i}", ttl=ttl) for i, kv in enumerate(kvs)]
    tasks = [asyncio.create_task(e.campaign()) for e in elections]
    done, _ = await asyncio.wait(tasks, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    first = next(iter(done)).result()
    leader = next(e for e in elections if e.identity == first.identity)
    guard = FencedResource(kvs[0], "fenced/resource")
    await guard.write(first.token, b"first")
    assert leader.session is not None
    for t in leader.session._tasks:  # crash: no more keep-alives, no resign
        t.cancel()
    loop = asyncio.get_running_loop()
    crashed_at = loop.time()
    others = [t for t in tasks if t not in done]
    done2, _ = await asyncio.wait(others, timeout=ttl + 3, return_when=asyncio.FIRST_COMPLETED)
    took = loop.time() - crashed_at
    assert len(done2) == 1, "no new leader"
    second = next(iter(done2)).result()
    assert second.identity != first.identity and second.token > first.token
    assert took <= ttl + 1.0, f"failover took {took:.2f}s"
    await guard.write(second.token, b"second")
    with pytest.raises(StaleToken):
        await guard.write(first.token, b"late write by the crashed leader")
    for e in elections:
        if e is not leader:
            await e.resign()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for kv in kvs:
        await kv.close()
