"""`?prefix=` for drivers whose store has no namespaces of its own (memory, SQLite).

`PrefixedKV(kv, prefix)` stores every key under `prefix` and hands keys back without it,
so two prefixes on one store never see each other's keys, and one prefix shared by two
programs is one namespace. Revisions, leases and watches are the store's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from podkit.backends.base import KV, Entry, Event


class PrefixedKV:
    """`kv` seen through `prefix`; the URL is the one opened (with its ?prefix=)."""

    def __init__(self, kv: KV, prefix: str, url: str) -> None:
        self._kv = kv
        self.prefix = prefix
        self.url = url

    def _entry(self, e: Entry | None) -> Entry | None:
        if e is None:
            return None
        return Entry(e.key[len(self.prefix) :], e.value, e.revision, e.created, e.lease)

    async def get(self, key: str) -> Entry | None:
        return self._entry(await self._kv.get(self.prefix + key))

    async def range(self, prefix: str) -> list[Entry]:
        n = len(self.prefix)
        return [
            Entry(e.key[n:], e.value, e.revision, e.created, e.lease)
            for e in await self._kv.range(self.prefix + prefix)
        ]

    async def revision(self) -> int:
        return await self._kv.revision()

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return await self._kv.put(self.prefix + key, value, lease=lease)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int | None:
        return await self._kv.create(self.prefix + key, value, lease=lease)

    async def update(
        self, key: str, value: bytes, *, revision: int, lease: int | None = None
    ) -> int | None:
        return await self._kv.update(self.prefix + key, value, revision=revision, lease=lease)

    async def delete(self, key: str) -> bool:
        return await self._kv.delete(self.prefix + key)

    async def delete_if(self, key: str, *, revision: int) -> bool:
        return await self._kv.delete_if(self.prefix + key, revision=revision)

    async def grant(self, ttl: float) -> int:
        return await self._kv.grant(ttl)

    async def keep_alive(self, lease: int) -> bool:
        return await self._kv.keep_alive(lease)

    async def revoke(self, lease: int) -> None:
        await self._kv.revoke(lease)

    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncIterator[Event]:
        n = len(self.prefix)
        async for ev in self._kv.watch(
            self.prefix + key, prefix=prefix, start_revision=start_revision
        ):
            yield Event(ev.kind, ev.key[n:], ev.value, ev.revision)

    async def close(self) -> None:
        await self._kv.close()


def url_prefix(query: dict[str, str]) -> str:
    """The `?prefix=` of a URL's query ('' when none)."""
    return query.get("prefix", "")
