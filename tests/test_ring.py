"""podkit.ring: keys move only to or from the node that changed; weights share the keys."""

from __future__ import annotations

from collections import Counter

from podkit.ring import Ring

KEYS = [f"user-{i}".encode() for i in range(20_000)]


def ring_of(*nodes: tuple[str, int]) -> Ring[str]:
    return Ring((name, name, weight) for name, weight in nodes)


def test_a_node_that_leaves_moves_only_its_own_keys() -> None:
    before = ring_of(("a", 1), ("b", 1), ("c", 1), ("d", 1))
    after = ring_of(("a", 1), ("b", 1), ("d", 1))
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert moved and all(before.owner(k) == "c" for k in moved)
    assert len(moved) == sum(1 for k in KEYS if before.owner(k) == "c")


def test_a_node_that_joins_takes_keys_only_and_about_its_share() -> None:
    before = ring_of(("a", 1), ("b", 1), ("c", 1))
    after = ring_of(("a", 1), ("b", 1), ("c", 1), ("d", 1))
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    assert all(after.owner(k) == "d" for k in moved)
    assert 0.20 < len(moved) / len(KEYS) < 0.30  # a quarter, within the ring's spread


def test_weights_share_the_keys() -> None:
    counts = Counter(ring_of(("a", 1), ("b", 3)).owner(k) for k in KEYS)
    assert 0.70 < counts["b"] / len(KEYS) < 0.80


def test_a_refused_owner_passes_its_key_to_the_next_node_and_gets_it_back() -> None:
    ring = ring_of(("a", 1), ("b", 1), ("c", 1))
    owners = {k: ring.owner(k) for k in KEYS[:2000]}
    without_b = {k: ring.owner(k, lambda n: n != "b") for k in KEYS[:2000]}
    assert all(without_b[k] == o for k, o in owners.items() if o != "b")
    assert all(without_b[k] in ("a", "c") for k in owners)
    assert ring.owner(b"x", lambda n: False) is None
    assert Ring[str]().owner(b"x") is None
    # the same nodes in another order place every key the same way
    shuffled = ring_of(("c", 1), ("a", 1), ("b", 1))
    assert all(shuffled.owner(k) == o for k, o in owners.items())
