"""Hypothesis state machines: KV and Queue drivers against a simple in-test model."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import make_url
from podkit.backends import KV, Message, Queue, open_kv, open_queue

KEYS = st.sampled_from(["a", "b", "a/x", "a/y", "b/z"])
VALUES = st.binary(max_size=16)


class KVMachine(RuleBasedStateMachine):
    """Every operation's result must match a dict of key -> (value, revision, created)."""

    url: str

    @initialize()
    def open(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.kv: KV = self.run(open_kv(self.url))
        self.model: dict[str, tuple[bytes, int, int]] = {
            e.key: (e.value, e.revision, e.created) for e in self.run(self.kv.range(""))
        }
        self.last = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        if hasattr(self, "kv"):
            self.run(self.kv.close())
            self.loop.close()

    def _advanced(self, rev: int) -> int:
        assert rev > self.last, f"revision {rev} not after {self.last}"
        self.last = rev
        return rev

    @rule(key=KEYS, value=VALUES)
    def put(self, key: str, value: bytes) -> None:
        rev = self._advanced(self.run(self.kv.put(key, value)))
        created = self.model[key][2] if key in self.model else rev
        self.model[key] = (value, rev, created)

    @rule(key=KEYS, value=VALUES)
    def create(self, key: str, value: bytes) -> None:
        rev = self.run(self.kv.create(key, value))
        if key in self.model:
            assert rev is None
        else:
            assert rev is not None
            self.model[key] = (value, self._advanced(rev), rev)

    @rule(key=KEYS, value=VALUES, stale=st.booleans())
    def update(self, key: str, value: bytes, stale: bool) -> None:
        current = self.model.get(key)
        expected = current[1] if current else 1
        rev = self.run(self.kv.update(key, value, revision=expected - 1 if stale else expected))
        if current is None or stale:
            assert rev is None
        else:
            assert rev is not None
            self.model[key] = (value, self._advanced(rev), current[2])

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        assert self.run(self.kv.delete(key)) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=KEYS, stale=st.booleans())
    def delete_if(self, key: str, stale: bool) -> None:
        current = self.model.get(key)
        rev = (current[1] if current else 1) - (1 if stale else 0)
        deleted = self.run(self.kv.delete_if(key, revision=rev))
        assert deleted == (current is not None and not stale)
        if deleted:
            self.model.pop(key)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        entry = self.run(self.kv.get(key))
        if key not in self.model:
            assert entry is None
        else:
            assert entry is not None
            assert (entry.value, entry.revision, entry.created) == self.model[key]

    @rule(prefix=st.sampled_from(["", "a", "a/", "b/", "c"]))
    def range(self, prefix: str) -> None:
        got = [(e.key, e.value) for e in self.run(self.kv.range(prefix))]
        want = sorted((k, v[0]) for k, v in self.model.items() if k.startswith(prefix))
        assert got == want


class QueueMachine(RuleBasedStateMachine):
    """Deliveries, acks, nacks and dead letters must match a model of item states."""

    url: str
    MAX = 3

    @initialize()
    def open(self) -> None:
        self.loop = asyncio.new_event_loop()
        name = f"model{uuid.uuid4().hex[:8]}"  # a fresh queue for every example
        self.q: Queue = self.run(open_queue(self.url, name=name, max_attempts=self.MAX))
        self.ready: set[str] = set()
        self.payloads: dict[str, bytes] = {}
        self.keys: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self.held: dict[str, Message] = {}
        self.dead: set[str] = set()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        if hasattr(self, "q"):
            self.run(self.q.close())
            self.loop.close()

    @rule(payload=VALUES, key=st.none() | st.sampled_from(["k1", "k2", "k3"]))
    def enqueue(self, payload: bytes, key: str | None) -> None:
        item = self.run(self.q.enqueue(payload, key=key))
        if key is not None and key in self.keys:
            assert item == self.keys[key]
            return
        assert item not in self.payloads
        self.payloads[item] = payload
        self.attempts[item] = 0
        self.ready.add(item)
        if key is not None:
            self.keys[key] = item

    @rule(n=st.integers(1, 4))
    def dequeue(self, n: int) -> None:
        got: list[Message] = self.run(self.q.dequeue(n, visibility=60))
        assert len(got) == min(n, len(self.ready))
        for m in got:
            assert m.id in self.ready
            assert m.payload == self.payloads[m.id]
            self.attempts[m.id] += 1
            assert m.attempts == self.attempts[m.id]
            self.ready.discard(m.id)
            self.held[m.id] = m

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        held = list(self.held)  # in delivery order: the draw must not depend on the ids
        picks = data.draw(st.lists(st.integers(0, len(held) - 1), min_size=1, unique=True))
        self.run(self.q.ack([self.held.pop(held[i]) for i in picks]))

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        item = list(self.held)[data.draw(st.integers(0, len(self.held) - 1))]
        self.run(self.q.nack(self.held.pop(item), error=f"failed {item}"))
        if self.attempts[item] >= self.MAX:
            self.dead.add(item)
        else:
            self.ready.add(item)

    @invariant()
    def stats_match(self) -> None:
        if not hasattr(self, "q"):
            return
        s = self.run(self.q.stats())
        assert (s.depth, s.in_flight, s.dead) == (len(self.ready), len(self.held), len(self.dead))


def _machine_test(machine: type[RuleBasedStateMachine], url: str) -> Callable[[], None]:
    attrs = {"url": url}
    cls = type(f"{machine.__name__}Bound", (machine,), attrs)
    cls.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
    return cls.TestCase().runTest  # type: ignore[no-any-return]


@pytest.mark.parametrize("driver", ["memory", "sqlite", "redis", "nats", "etcd"])
def test_kv_matches_the_model(driver: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _machine_test(KVMachine, make_url(driver, request, tmp_path))()


@pytest.mark.parametrize("driver", ["memory", "sqlite", "redis", "nats"])
def test_queue_matches_the_model(
    driver: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    _machine_test(QueueMachine, make_url(driver, request, tmp_path))()
