"""The compiled build (`PODKIT_COMPILE=1`, setup.py) is the same proxy: it builds from a
copy of this checkout, the modules setup.py names are C extensions, and the proxy's own
tests pass against it (run in a subprocess with the build first on PYTHONPATH; the
`podkit` commands those tests start inherit it)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import require_binary

ROOT = Path(__file__).resolve().parents[2]
# the tests of everything that runs on the compiled modules
SUITES = [
    "tests/lb",
    "tests/test_tls.py",
    "tests/test_tlsconn.py",
    "tests/test_tls_sidecar.py",
    "tests/test_split.py",
    "tests/test_lb_members.py",
]


def compiled_modules() -> list[str]:
    """The module names setup.py's COMPILED list gives to mypyc (tools/check_wheel.py's
    reading of it, the one the wheel is checked by)."""
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "tools" / "check_wheel.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names: list[str] = module.compiled_modules()
    return names


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a PODKIT_COMPILE=1 build of this checkout (the benchmarks'
    builder)."""
    require_binary("gcc", "gcc")
    spec = importlib.util.spec_from_file_location("bench_lb", ROOT / "benchmarks" / "lb.py")
    assert spec is not None and spec.loader is not None
    bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # for dataclasses
    spec.loader.exec_module(bench)
    dest = tmp_path_factory.mktemp("compiled") / "site"
    bench.build_compiled(dest)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest), env.get("PYTHONPATH")]))
    return env


def test_the_hot_modules_are_compiled(build: dict[str, str]) -> None:
    names = compiled_modules()
    assert "podkit.net.proxy.engine" in names and "podkit.net.http" in names
    code = "import importlib,sys\nfor n in sys.argv[1:]: print(importlib.import_module(n).__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code, *names, "podkit.net.proxy.hooks"],
        env=build,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    *hot, hooks = out
    assert len(hot) == len(names)
    for name, path in zip(names, hot, strict=True):
        assert path.endswith(".so"), f"{name} is not compiled: {path}"
        assert not path.startswith(str(ROOT)), f"{name} comes from the checkout: {path}"
    assert hooks.endswith(".py")  # the rest stays Python: users subclass its filters


def test_the_proxy_tests_pass_against_the_compiled_build(build: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "--ignore", str(Path(__file__).relative_to(ROOT)), *SUITES],
        cwd=ROOT, env=build, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    tail = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail
