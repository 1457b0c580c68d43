"""Install a built podkit wheel into a new virtual environment and check that every
module of setup.py's COMPILED list is a compiled extension there.

    python tools/check_wheel.py dist/podkit-*.whl
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compiled_modules() -> list[str]:
    """The module names of setup.py's COMPILED list."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            paths = ast.literal_eval(node.value)
            return [p.removeprefix("src/").removesuffix(".py").replace("/", ".") for p in paths]
    raise SystemExit("setup.py has no COMPILED list")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    wheel = Path(sys.argv[1]).resolve()
    names = compiled_modules()
    with tempfile.TemporaryDirectory(prefix="podkit-wheel-") as tmp:
        venv.create(tmp, with_pip=True)
        py = str(Path(tmp) / "bin" / "python")
        subprocess.run([py, "-m", "pip", "install", "-q", str(wheel)], check=True)
        code = (
            "import importlib, sys\n"
            "for n in sys.argv[1:]: print(importlib.import_module(n).__file__)"
        )
        out = subprocess.run(
            [py, "-c", code, *names], capture_output=True, text=True, check=True, cwd=tmp
        ).stdout.split()
    pure = [f"{n}: {path}" for n, path in zip(names, out, strict=True) if not path.endswith(".so")]
    if pure:
        print("not compiled in the wheel:\n  " + "\n  ".join(pure), file=sys.stderr)
        return 1
    short = ", ".join(n.rsplit(".", 1)[1] for n in names)
    print(f"{wheel.name}: {len(names)} modules compiled: {short}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
