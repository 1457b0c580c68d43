"""Fixtures with real servers. Temp dirs and logs are kept when a test failed."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

import pytest

from servers import EtcdServer, NatsServer, RedisServer, Server

S = TypeVar("S", bound=Server)

_failed_items: set[str] = set()
_kept: list[Server] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        _failed_items.add(item.nodeid)
    return report


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # every run says what it left out, so a green run with skips never looks whole
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if r.when != "teardown"]
    reasons = Counter(_skip_reason(r) for r in skipped)
    said = "; ".join(f"{n} x {why}" for why, n in reasons.most_common())
    terminalreporter.write_sep("-", f"skipped: {len(skipped)}" + (f" ({said})" if said else ""))
    _doc_examples(terminalreporter)
    for server in _kept:
        terminalreporter.write_sep("-", f"kept {server.name} dir {server.dir}")
        terminalreporter.write_line(server.log_tail(12))


def _doc_examples(terminalreporter: pytest.TerminalReporter) -> None:
    """How many examples of README.md and docs/ ran (tests/test_docs.py), and how many
    are marked not run there."""
    reports = [
        r
        for kind in ("passed", "failed", "skipped")
        for r in terminalreporter.stats.get(kind, [])
        if r.when == "call" and re.search(r"test_docs\.py::test_(example|not_run)\[", r.nodeid)
    ]
    if not reports:
        return
    ran = [r for r in reports if "::test_example[" in r.nodeid]
    passed = sum(r.passed for r in ran)
    commands = sum(int(v) for r in ran for k, v in r.user_properties if k == "doc commands")
    not_run = len(reports) - len(ran)
    terminalreporter.write_sep(
        "-",
        f"doc examples: {len(ran)} run ({passed} passed; {commands} commands and Python "
        f"blocks), {not_run} marked not run (their reasons are with the skips)",
    )


def _serve(server: S, failed: Callable[[], bool]) -> Iterator[S]:
    """Start, yield, stop; delete the temp dir unless something failed."""
    started = False
    try:
        server.start()
        started = True
        yield server
    finally:
        server.stop()
        if started and not failed():
            server.remove()
        else:
            _kept.append(server)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from _serve(RedisServer(), lambda: bool(_failed_items))


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    yield from _serve(NatsServer(), lambda: bool(_failed_items))


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    # etcd's minimum lease TTL is ceil(1.5 x election timeout): 2 s by default, 1 s here,
    # so the contract's 1 s leases are 1 s leases.
    fast_leases = ["--heartbeat-interval=10", "--election-timeout=100"]
    yield from _serve(EtcdServer(extra_args=fast_leases), lambda: bool(_failed_items))


@pytest.fixture
def fresh_redis(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A private Redis with appendonly yes, for fault tests."""
    yield from _serve(RedisServer(appendonly=True), lambda: request.node.nodeid in _failed_items)
