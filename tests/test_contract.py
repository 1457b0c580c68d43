"""The component contract: patterns register components and hooks, the system names none
of them, `with:` values are checked against the component's typed options, and a
service hook's program is supervised and probed on its ready ports."""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest

from podkit.contract import Pattern, Process, ServiceHook, patterns
from podkit.system.components import component_options, known_components
from podkit.system.procservice import ProcessService
from podkit.system.spec import Pod, Service, SpecError, parse_spec
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "podkit"
PATTERN_PACKAGES = sorted(p.parent.name for p in SRC.glob("*/pattern.py"))


def test_every_pattern_package_is_registered_and_its_components_have_options() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    registered = project["project"]["entry-points"]["podkit.patterns"]
    assert sorted(registered) == PATTERN_PACKAGES
    assert all(isinstance(p, Pattern) for p in patterns())
    for name in known_components():
        options = component_options(name)
        assert options, f"component {name}: its command has no options"


def test_hooks_add_their_fields_to_pods_and_services() -> None:
    hooks = {h.key for p in patterns() for h in p.pod_hooks}
    assert {"election", "autoscale"} <= hooks <= set(Pod.model_fields)
    assert "lb" in Service.model_fields
    # a hook's field keeps pydantic's own errors and places
    with pytest.raises(SpecError) as info:
        parse_spec(
            "name: s\npods:\n  - name: p\n    election: {ttl: -1}\n"
            "    containers: [{name: a, command: [x]}]\n"
        )
    assert "pods[0].election.ttl" in str(info.value)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_system_names_no_pattern() -> None:
    offenders = []
    for path in sorted((SRC / "system").glob("*.py")):
        text = path.read_text()
        for pkg in PATTERN_PACKAGES:
            named = any(
                m == f"podkit.{pkg}" or m.startswith(f"podkit.{pkg}.") for m in _imports(path)
            )
            if named or f'"podkit.{pkg}' in text:
                offenders.append(f"{path.name} names podkit.{pkg}")
    assert offenders == []


SPEC = """
name: s
pods:
  - name: p
    containers:
      - name: app
        command: [sleep, "9"]
      - name: tls
        component: sidecar.tls
        with: {listen: 8443, upstream: "127.0.0.1:8080", %s}
"""


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        ("workers: many", "with.workers: option 'workers': Input should be a valid integer"),
        ("self_signed: 'yes'", "with.self_signed: option 'self_signed' takes true or false"),
        ("workers: true", "with.workers: option 'workers' takes a value, not true or false"),
        ("workers: [1, 2]", "with.workers: option 'workers' takes one value, not a list"),
    ],
)
def test_with_values_are_checked_against_the_components_typed_options(
    given: str, complaint: str
) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(SPEC % given, "s.yaml")
    (issue,) = info.value.issues
    assert issue.line == 10 and complaint in str(issue)


def test_with_values_that_the_command_reads_as_text_pass() -> None:
    spec = parse_spec(SPEC % "workers: 2, self_signed: true, admin_port: $(PORT_ADMIN)")
    assert spec.pods[0].containers[1].with_["workers"] == 2


# -- a service hook's program under `podkit up` -------------------------------------------

PROGRAM = textwrap.dedent(
    """
    import asyncio, os, sys
    host, port, admin, members, mode = sys.argv[1:]

    async def drop(reader, writer):
        writer.close()

    async def ready(reader, writer):
        await reader.readuntil(b"\\r\\n\\r\\n")
        ok = mode == "ok" and os.path.getsize(members) > 0
        status = b"200 OK" if ok else b"503 No"
        writer.write(b"HTTP/1.1 %s\\r\\nContent-Length: 0\\r\\n\\r\\n" % status)
        await writer.drain()
        writer.close()

    async def main():
        await asyncio.start_server(drop, host, int(port))
        await asyncio.start_server(ready, host, int(admin))
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


class FakeHook(ServiceHook):
    key = "fake"

    def __init__(self, script: Path, mode: str) -> None:
        self.script = script
        self.mode = mode

    def process(self, name: str, host: str, port: int, options: Any, free_ports: Any) -> Process:
        admin = free_ports(1)

        def argv(members: str) -> list[str]:
            return [
                sys.executable,
                str(self.script),
                host,
                str(port),
                str(admin),
                members,
                self.mode,
            ]

        return Process(argv, [admin], ready_host=host)


class FakeRuntime:
    def __init__(self, base: Path) -> None:
        self.base_dir = base
        self.state_dir = base / "state"
        self.changes = 0
        self.lines: list[str] = []
        self.watchdog = self
        self.log = self

    def watch(self, pid: int) -> None: ...
    def unwatch(self, pid: int) -> None: ...
    def event(self, text: str) -> None:
        self.lines.append(text)

    def line(self, source: str, text: str) -> None:
        self.lines.append(f"{source}: {text}")

    def changed(self) -> None:
        self.changes += 1


async def _until(check: Any, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())


def _service(port: int) -> Any:
    return parse_spec(
        f"name: s\npods: [{{name: p, containers: [{{name: a, command: [x]}}]}}]\n"
        f"services: [{{name: web, port: {port}, pods: p, target: 1}}]\n"
    ).services[0]


@pytest.mark.parametrize("mode", ["ok", "never"])
async def test_a_service_program_routes_only_with_members_and_a_ready_answer(
    tmp_path: Path, mode: str
) -> None:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    runtime = FakeRuntime(tmp_path)
    svc = ProcessService(_service(free_port()), FakeHook(script, mode), None, runtime)  # type: ignore[arg-type]
    await svc.start()
    try:
        await asyncio.sleep(0.3)
        assert not svc.routing  # no members yet, whatever the program says
        svc.set_endpoints([("127.0.0.1", 9)])
        assert svc.members.read_text() == "127.0.0.1:9\n"
        if mode == "never":  # members, but the program never answers ready
            assert not await _until(lambda: svc.routing, 1.5)
            return
        assert await _until(lambda: svc.routing)
        assert runtime.changes >= 1
        svc.set_endpoints([])
        assert not svc.routing and svc.members.read_text() == ""
        svc.set_endpoints([("127.0.0.1", 9)])
        assert await _until(lambda: svc.routing)
        # killed: started again, and routes again once it answers ready
        assert svc.proc is not None
        os.kill(svc.proc.pid, signal.SIGKILL)
        assert await _until(lambda: svc.restarts == 1)
        assert await _until(lambda: svc.routing)
    finally:
        await svc.close()


def test_every_module_of_net_has_its_layer() -> None:
    """podkit.net spans two layers (the HTTP wire below the backends, the rest above):
    a new module of net that is in neither would escape the layers check."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in project["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    named = {m.strip() for layer in contract["layers"] for m in layer.replace("|", ":").split(":")}
    modules = {
        f"podkit.net.{p.stem if p.suffix == '.py' else p.name}"
        for p in (SRC / "net").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
    }
    assert modules - named == set()
