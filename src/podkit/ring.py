"""Consistent hashing: a ring of points on a 64-bit circle, each owned by a node.

    ring = Ring([("a", "10.0.0.1:80", 1), ("b", "10.0.0.2:80", 2)])
    ring.owner(b"user-42")                       # the node whose point follows the key
    ring.owner(b"user-42", lambda n: n != "a")   # the first node after it that qualifies

A node of weight w owns `points * w` points, placed by hashing its name with the point's
index (blake2b, 64 bits), so a node that leaves moves only the keys it owned (to the next
points on the ring) and one that joins takes only keys from its neighbours. Used by the
balancer's consistent-hash policy.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def hash64(data: bytes) -> int:
    """The 64-bit position of `data` on the ring."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring(Generic[T]):
    """`nodes` as (node, name, weight); `points` per unit of weight."""

    def __init__(self, nodes: Iterable[tuple[T, str, int]] = (), points: int = 160) -> None:
        placed: list[tuple[int, str, T]] = []
        count = 0
        for node, name, weight in nodes:
            count += 1
            for i in range(points * weight):
                placed.append((hash64(f"{name}#{i}".encode()), name, node))
        placed.sort(key=lambda p: (p[0], p[1]))  # equal points: by name, the same everywhere
        self.size = count  # nodes on the ring
        self._points = [p[0] for p in placed]
        self._owners = [p[2] for p in placed]

    def owner(self, key: bytes, accept: Callable[[T], bool] | None = None) -> T | None:
        """The node owning `key`: the first (that `accept`s, when given) at or after the
        key's point, walking round; None when the ring is empty or none qualifies."""
        points = self._points
        n = len(points)
        if not n:
            return None
        owners = self._owners
        i = bisect.bisect_left(points, hash64(key))
        if accept is None:
            return owners[i % n]
        seen: set[int] = set()
        for j in range(n):
            node = owners[(i + j) % n]
            if accept(node):
                return node
            seen.add(id(node))
            if len(seen) == self.size:
                break
        return None
