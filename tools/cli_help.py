"""Write docs/cli.md: the help of `podkit lb`, `podkit up` and `podkit queue work`, as
the `podkit` command prints it at 80 columns, with no colour.

    .venv/bin/python tools/cli_help.py

tests/test_cli_help.py checks that docs/cli.md holds what the commands print now.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
SHOWN = (("lb",), ("up",), ("queue", "work"))  # the help screens docs/cli.md shows
ENV = {"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}

INTRO = """\
# The `podkit` command

`podkit --help` lists the commands, and `podkit COMMAND --help` tells what a command
does and takes. Every help screen says, in this order:

- its usage, and what the command does;
- its options, in groups, each with its default or `[required]` (an option with
  neither is unused unless given); a pair of switches shows as `--[no-]name`, and
  `--help` itself is not listed;
- one example, and the page of these docs that tells more.

A help screen fits 80 columns: the help of an option wraps beside its name, and nothing
is cut. Below are three of them as they print at 80 columns (`COLUMNS=80`).

This page is generated from the commands (`tools/cli_help.py`): change a command's
options or help, not this page, then regenerate it:

```sh
.venv/bin/python tools/cli_help.py
```
"""


def help_text(words: tuple[str, ...]) -> str:
    """`podkit WORDS --help` as the `podkit` command of this virtualenv prints it."""
    podkit = Path(sys.executable).with_name("podkit")
    result = subprocess.run(
        [str(podkit), *words, "--help"],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def render() -> str:
    """The whole of docs/cli.md."""
    sections = [INTRO]
    for words in SHOWN:
        command = " ".join(("podkit", *words))
        sections.append(f"## `{command} --help`\n\n```text\n{help_text(words)}```\n")
    return "\n".join(sections)


def main() -> None:
    DOC.write_text(render(), encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
