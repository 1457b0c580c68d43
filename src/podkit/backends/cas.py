"""Read-modify-write on any `KV`: `cas_update`."""

from __future__ import annotations

from collections.abc import Callable

from podkit.backends.base import KV, BackendError


async def cas_update(
    kv: KV, key: str, change: Callable[[bytes | None], bytes], *, attempts: int = 100
) -> int:
    """Read-modify-write `key` with compare-and-swap on its revision (the resourceVersion
    way): `change(old_value_or_None) -> new_value`, retried when someone else wrote first."""
    for _ in range(attempts):
        entry = await kv.get(key)
        new = change(None if entry is None else entry.value)
        if entry is None:
            rev = await kv.create(key, new)
        else:
            rev = await kv.update(key, new, revision=entry.revision)
        if rev is not None:
            return rev
    raise BackendError(f"{key}: {attempts} compare-and-swap attempts lost to other writers")
