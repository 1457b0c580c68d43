"""`podkit.net.discovery`: the members file resolver, the follower, and one registry that
the broker and the balancer both follow."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from podkit.ambassador.broker import Broker
from podkit.backends import open_kv
from podkit.clock import ManualClock
from podkit.lb.members import KVMembers, parse_members
from podkit.lb.policy import Upstream
from podkit.net.discovery import (
    FileResolver,
    Follower,
    KVRegistry,
    MembersError,
    Registration,
    ResolveError,
    StaticResolver,
    write_members,
)
from podkit.net.discovery import parse_members as parse_entries


def quiet(_: str) -> None:
    return None


# ---------------------------------------------------------------------------- members file


def test_members_are_endpoints_unless_a_parse_reads_them_otherwise() -> None:
    text = "# cache\n10.0.0.1:6379\n\n[::1]:6380  # local\n"
    assert parse_entries(text) == [("10.0.0.1", 6379), ("::1", 6380)]
    with pytest.raises(MembersError, match=r"m:2: 'x' is not host:port"):
        parse_entries("10.0.0.1:1\nx\n", "m")
    with pytest.raises(MembersError, match=r"m:3: 10.0.0.1:1 is listed twice"):
        parse_entries("10.0.0.1:1\n10.0.0.2:1\n 10.0.0.1:1\n", "m")
    # the balancer's syntax: a weight does not make an upstream another one
    with pytest.raises(MembersError, match=r"<members>:2: 10.0.0.1:1 is listed twice"):
        parse_members("http://10.0.0.1:1\n10.0.0.1:1,weight=2\n")


async def test_file_resolver_refuses_a_bad_file_whole_until_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "members"
    files = FileResolver(path)
    with pytest.raises(ResolveError, match=rf"members file {path} unreadable: No such file"):
        await files.resolve()
    write_members(path, ["10.0.0.1:80", "10.0.0.2:80"])
    assert await files.resolve() == [("10.0.0.1", 80), ("10.0.0.2", 80)]
    write_members(path, ["10.0.0.1:80", "10.0.0.3"])
    for _ in range(2):  # refused again while the file stays as it is
        with pytest.raises(ResolveError, match=rf"refused: {path}:2: '10.0.0.3'"):
            await files.resolve()
    write_members(path, ["10.0.0.3:80"])
    assert await files.resolve() == [("10.0.0.3", 80)]
    write_members(path, [])
    assert await files.resolve() == []
    assert not list(tmp_path.glob(".members.*"))  # the temporary file was renamed


async def test_file_resolver_reads_only_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "members"
    write_members(path, ["10.0.0.1:80"])
    os.utime(path, ns=(0, 0))
    parsed: list[str] = []

    def parse(text: str) -> str:
        parsed.append(text)
        return text

    files = FileResolver(path, parse, name=str)
    assert await files.resolve() == await files.resolve() == ["10.0.0.1:80"]
    assert parsed == ["10.0.0.1:80"]
    write_members(path, ["10.0.0.2:80"])
    os.utime(path, ns=(0, 0))  # the same size and time: the new inode is the change
    assert await files.resolve() == ["10.0.0.2:80"]


# ---------------------------------------------------------------------------- the follower


class Scripted:
    """A resolver that answers what a test sets: a list, or an error."""

    def __init__(self, name: str, answer: list[tuple[str, int]] | str) -> None:
        self.description = name
        self.answer = answer
        self.watches = 0

    async def resolve(self) -> list[tuple[str, int]]:
        if isinstance(self.answer, str):
            raise ResolveError(f"{self.description}: {self.answer}")
        return list(self.answer)

    async def watch(self, changed: Callable[[], None]) -> None:
        self.watches += 1
        if self.watches == 1:
            raise ResolveError(f"{self.description}: watch lost")
        await asyncio.Event().wait()  # up, and nothing changes


async def test_follower_merges_and_a_failing_resolver_keeps_its_last_list() -> None:
    a, b = Scripted("a", "down"), Scripted("b", [("h", 2)])
    seen: list[list[tuple[str, int]]] = []
    logs: list[str] = []
    follower = Follower([a, b], seen.append, log=logs.append)
    b.answer = "down"
    assert await follower.refresh() == [] and seen == []  # nobody answered: nothing applied
    assert follower.last_errors == {"a": "a: down", "b": "b: down"}
    a.answer, b.answer = [("h", 1)], [("h", 2)]
    assert await follower.refresh() == [("h", 1), ("h", 2)] and seen[-1] == [("h", 1), ("h", 2)]
    assert follower.last_errors == {"a": None, "b": None}
    a.answer = "down again"
    assert await follower.refresh() == [("h", 1), ("h", 2)]
    await follower.refresh()
    assert [line for line in logs if "down again" in line] == [
        "a: down again; keeping the last list (1)"  # logged once, not at every resolve
    ]
    assert follower.last_errors["a"] == "a: down again"


async def test_follower_watches_again_after_a_back_off_and_resolves() -> None:
    clock = ManualClock()
    source = Scripted("s", [("h", 1)])
    seen: list[list[tuple[str, int]]] = []
    follower = Follower([source], seen.append, interval=3600, clock=clock, log=quiet)
    await follower.refresh()
    task = asyncio.create_task(follower.run())
    try:
        while clock.sleepers == 0:  # the first watch failed: it waits 0.1 s
            await asyncio.sleep(0.01)
        source.answer = [("h", 2)]
        await clock.advance(0.1)
        deadline = time.monotonic() + 2
        while seen[-1] != [("h", 2)]:  # resolved at once, not after the hour
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert source.watches == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_static_resolver_never_pushes() -> None:
    static = StaticResolver([("h", 1)])
    assert static.description == "static h:1"
    await asyncio.wait_for(static.watch(lambda: None), 1)


# ---------------------------------------------------------------------------- both sides


async def test_one_registration_is_followed_by_the_broker_and_the_balancer() -> None:
    kv = await open_kv(f"memory://discovery-{time.monotonic_ns()}")
    upstreams: list[list[Upstream]] = []
    members = KVMembers(kv, "svc/", upstreams.append, log=quiet)
    broker = Broker([KVRegistry(kv, "svc/", log=quiet)], refresh=30, log=quiet)
    await broker.start()
    follow = asyncio.create_task(members.run())

    async def until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 2
        while not done():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    try:
        await until(lambda: upstreams == [[]])
        async with Registration(kv, "svc/", ("127.0.0.9", 8080), ttl=5):
            await until(lambda: broker.endpoints.endpoints == [("127.0.0.9", 8080)])
            await until(lambda: [u.name for u in upstreams[-1]] == ["127.0.0.9:8080"])
        await until(lambda: broker.endpoints.endpoints == [] and upstreams[-1] == [])
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await broker.close()
        await kv.close()
