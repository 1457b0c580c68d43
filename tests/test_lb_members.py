"""Balancer membership from a watched file or KV prefix: changes apply, bad input keeps
the last good list and says where it is wrong."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from podkit.backends import open_kv
from podkit.lb.members import (
    DNSMembers,
    FileMembers,
    KVMembers,
    MembersError,
    parse_members,
    write_members,
)
from podkit.lb.policy import Upstream


def names(ups: list[Upstream]) -> list[tuple[str, int]]:
    return [(u.name, u.weight) for u in ups]


def test_parse_members_with_comments_weights_and_errors() -> None:
    text = "# replicas\nhttp://127.0.0.2:8080\n\n127.0.0.3:8080,weight=3  # big one\n"
    assert names(parse_members(text)) == [("127.0.0.2:8080", 1), ("127.0.0.3:8080", 3)]
    with pytest.raises(MembersError, match=r"m.txt:2: .*weight"):
        parse_members("127.0.0.2:1\n127.0.0.3:1,weight=x\n", "m.txt")
    with pytest.raises(MembersError, match=r"m.txt:2: 127.0.0.2:1 is listed twice"):
        parse_members("127.0.0.2:1\nhttp://127.0.0.2:1\n", "m.txt")


async def test_file_members_follow_atomic_rewrites_and_keep_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "members"
    seen: list[list[tuple[str, int]]] = []
    logs: list[str] = []
    fm = FileMembers(path, lambda ups: seen.append(names(ups)), log=logs.append)
    assert not await fm.check() and "unreadable" in logs[-1]  # not there yet
    assert seen == []  # nothing read: nothing applied
    write_members(path, ["127.0.0.2:80", "127.0.0.3:80"])
    assert await fm.check() and seen[-1] == [("127.0.0.2:80", 1), ("127.0.0.3:80", 1)]
    assert not await fm.check()  # unchanged
    path.write_text("127.0.0.2:80\nnot a url at all:port\n")
    assert not await fm.check() and fm.last_error and f"{path}:2:" in fm.last_error
    assert len(seen) == 1  # the last good list stays
    write_members(path, ["127.0.0.2:80", "127.0.0.3:80,weight=2"])
    assert await fm.check() and seen[-1] == [("127.0.0.2:80", 1), ("127.0.0.3:80", 2)]
    write_members(path, [])
    assert await fm.check() and seen[-1] == []  # empty is a real state: nobody is ready


async def test_kv_members_follow_registrations_and_lease_expiry() -> None:
    kv = await open_kv("memory://")
    got: list[list[tuple[str, int]]] = []
    changed = asyncio.Event()

    def on_change(ups: list[Upstream]) -> None:
        got.append(names(ups))
        changed.set()

    async def next_list() -> list[tuple[str, int]]:
        await asyncio.wait_for(changed.wait(), 5)
        changed.clear()
        return got[-1]

    await kv.put("lb/web/a", b"127.0.0.2:8080")
    logs: list[str] = []
    members = KVMembers(kv, "lb/web/", on_change, log=logs.append)
    task = asyncio.create_task(members.run())
    try:
        assert await next_list() == [("127.0.0.2:8080", 1)]
        lease = await kv.grant(0.5)
        await kv.put("lb/web/b", b"127.0.0.3:8080,weight=2", lease=lease)
        assert await next_list() == [("127.0.0.2:8080", 1), ("127.0.0.3:8080", 2)]
        await kv.put("lb/web/c", b"garbage:port")  # skipped with a log line, the rest stays
        assert await next_list() == [("127.0.0.2:8080", 1)]  # b's lease ran out
        assert any("'lb/web/c' ignored" in line for line in logs)
        await kv.delete("lb/web/a")
        assert await next_list() == []
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kv.close()


async def test_dns_members_resolve_every_address_and_keep_the_last_on_failure() -> None:
    got: list[list[tuple[str, int]]] = []
    logs: list[str] = []
    dns = DNSMembers("localhost", 8080, lambda ups: got.append(names(ups)), log=logs.append)
    assert await dns.check()
    assert ("127.0.0.1:8080", 1) in got[-1]
    assert not await dns.check()  # the same answer is not applied again
    dns.resolver.name = "no-such-host.invalid"  # type: ignore[attr-defined]
    assert not await dns.check() and "keeping the last list" in logs[-1]
    assert len(got) == 1
