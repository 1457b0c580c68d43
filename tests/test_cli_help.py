"""The help of every `podkit` command at 80 columns: it fits, it names every option in
full with no type tag, shows defaults, gives an example and the docs; three of them are
docs/cli.md. A stray word after a plain command is a usage error that says so."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
from pathlib import Path
from unittest import mock

import pytest
import typer.main
from typer import _click
from typer.core import TyperGroup, TyperOption

from podkit import cli

ROOT = Path(__file__).resolve().parent.parent
ENV = {"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}
DOCUMENTED = (("lb",), ("up",), ("queue", "work"))  # as tools/cli_help.py shows them
REGENERATE = "regenerate it: .venv/bin/python tools/cli_help.py"
TYPE_TAG = re.compile(
    r"<(?:bool|str|int|float|path|text|file|list\[\w+\]|[\w ]+ range)>"
    r"|\b(?:TEXT|INTEGER|FLOAT|BOOLEAN)\b"
)


def root() -> _click.Command:
    cli._register_components()
    return typer.main.get_command(cli.app)


def _walk(command: _click.Command, words: tuple[str, ...]) -> list[tuple[str, ...]]:
    found = [words]
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            found += _walk(sub, (*words, name))
    return found


COMMANDS = _walk(root(), ())


def command(words: tuple[str, ...]) -> _click.Command:
    found = root()
    for word in words:
        assert isinstance(found, TyperGroup)
        found = found.commands[word]
    return found


def run(*args: str) -> tuple[int, str]:
    """`podkit ARGS` in a terminal of 80 columns: its exit code, and what it printed
    (stdout and stderr)."""
    printed = io.StringIO()
    with (
        mock.patch.dict(os.environ, ENV),
        contextlib.redirect_stdout(printed),
        contextlib.redirect_stderr(printed),
        pytest.raises(SystemExit) as exit_,
    ):
        root().main(list(args), prog_name="podkit")
    return int(exit_.value.code or 0), printed.getvalue()


@functools.cache
def help_of(words: tuple[str, ...]) -> str:
    code, text = run(*words, "--help")
    assert code == 0, text
    return text


def rows(text: str) -> dict[str, str]:
    """Each option the help names (`-o`, `--x`; `--x` and `--no-x` for `--[no-]x`) ->
    its row: the lines from its name to the next name, names and help together."""
    found: dict[str, str] = {}
    flags: list[str] = []
    last = ""  # the name column of the row's last line: `--a/` goes on below
    for line in text.splitlines():
        named = re.match(r"  (?:(-\w), )?(--\S+)", line)
        if named:
            flags = flags if last.endswith("/") else [named[1]] if named[1] else []
            last = named[2]
            for part in filter(None, last.split("/")):
                new = part.startswith("--[no-]")
                flags += ["--" + part[7:], "--no-" + part[7:]] if new else [part]
        elif not line.startswith("   "):
            flags, last = [], ""
        for flag in flags:
            found[flag] = found.get(flag, "") + " " + line.strip()
    return found


def options(words: tuple[str, ...]) -> list[TyperOption]:
    """The options of a command that its help lists: all but --help."""
    params = command(words).params
    return [p for p in params if isinstance(p, TyperOption) and p.name != "help"]


def shown(words: tuple[str, ...]) -> str:
    return "podkit " + " ".join(words) if words else "podkit"


@pytest.mark.parametrize("words", COMMANDS, ids=shown)
def test_the_help_fits_80_columns_with_no_type_tag(words: tuple[str, ...]) -> None:
    text = help_of(words)
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert not wide, f"{shown(words)} --help has lines over 80 columns:\n" + "\n".join(wide)
    tags = TYPE_TAG.findall(text)
    assert not tags, f"{shown(words)} --help shows type tags: {tags}"


@pytest.mark.parametrize("words", COMMANDS, ids=shown)
def test_the_help_names_every_option_in_full(words: tuple[str, ...]) -> None:
    named = rows(help_of(words))
    for option in options(words):
        for flag in (*option.opts, *option.secondary_opts):
            assert flag in named, f"{shown(words)} --help does not name {flag} in full"


@pytest.mark.parametrize("words", COMMANDS, ids=shown)
def test_the_help_gives_an_example_and_the_docs(words: tuple[str, ...]) -> None:
    lines = help_of(words).splitlines()
    examples = [line for line in lines if line.startswith(f"Example: {shown(words)}")]
    assert examples, f"{shown(words)} --help has no line 'Example: {shown(words)} ...'"
    docs = [m[1] for line in lines if (m := re.match(r"Docs: +([\w/.-]+\.md)", line))]
    assert docs, f"{shown(words)} --help has no line 'Docs: PAGE.md'"
    assert (ROOT / docs[0]).is_file(), f"{shown(words)} --help names {docs[0]}: no such file"


@pytest.mark.parametrize("words", COMMANDS, ids=shown)
def test_the_help_shows_every_default(words: tuple[str, ...]) -> None:
    named = rows(help_of(words))
    for option in options(words):
        has_default = option.default not in (None, [], ()) and not (
            option.is_flag and not option.secondary_opts
        )
        if has_default or isinstance(option.show_default, str):
            row = named[option.opts[-1]]
            assert "[default: " in row, f"{shown(words)}: {option.opts[-1]} shows no default"


@pytest.mark.parametrize(
    ("words", "flag", "default"),
    [
        (("lb",), "--retry-budget", "[default: 20, no cap]"),
        (("lb",), "--policy", "[default: round-robin]"),
        (("lb",), "--cache-entry-bytes", "[default: 1048576]"),
        (("lb",), "--passive-health", "[default: off]"),
        (("lb",), "--reuse-port", "[default: --reuse-port]"),
        (("elect",), "--grace", "[default: the lease's margin, TTL/4 up to 0.5]"),
        (("elect",), "--identity", "[default: $POD_NAME, else HOSTNAME-PID]"),
        (("elect",), "--backend", "[required, or env var PODKIT_BACKEND_STATE]"),
        (("queue", "work"), "--report", "[default: on]"),
        (("queue", "work"), "--visibility", "[default: 30]"),
    ],
)
def test_defaults_say_what_an_unset_option_does(
    words: tuple[str, ...], flag: str, default: str
) -> None:
    assert default in rows(help_of(words))[flag]


def test_options_show_in_their_groups() -> None:
    text = help_of(("lb",))
    groups = [line[:-1] for line in text.splitlines() if re.fullmatch(r"\w[\w ]*:", line)]
    assert groups == [
        "Upstreams and membership",
        "Listening",
        "Timeouts and retries",
        "Health checks",
        "Cache",
        "Rate limits",
        "Circuit breaking",
        "TLS",
        "Admin",
    ]
    after = text.split("\nCircuit breaking:\n")[1].split("\nTLS:\n")[0]
    assert [line.split()[0] for line in after.splitlines()] == [
        "--max-connections",
        "--max-pending",
        "--max-requests",
    ]


@pytest.mark.parametrize("words", DOCUMENTED, ids=shown)
def test_the_documented_helps_are_short_and_are_what_docs_cli_md_shows(
    words: tuple[str, ...],
) -> None:
    text = help_of(words)
    assert len(text.splitlines()) < 60, f"{shown(words)} --help: {len(text.splitlines())} lines"
    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    block = re.search(
        rf"^## `{re.escape(shown(words))} --help`\n\n```text\n(.*?)```", doc, re.M | re.S
    )
    assert block is not None, f"docs/cli.md has no help of {shown(words)}: {REGENERATE}"
    assert block[1] == text, f"docs/cli.md differs from {shown(words)} --help: {REGENERATE}"


@pytest.mark.parametrize("words", [("lb",), ("elect",)], ids=shown)
def test_lb_and_elect_are_plain_commands(words: tuple[str, ...]) -> None:
    assert not isinstance(command(words), TyperGroup)
    assert help_of(words).splitlines()[0] == f"Usage: {shown(words)} [OPTIONS]"


def test_a_stray_word_is_a_usage_error_that_says_what_the_command_takes() -> None:
    code, text = run("lb", "stray")
    assert code == 2
    assert "unexpected argument 'stray': podkit lb takes options only" in text
    assert "No such command" not in text
    # the stray word is told before an option it hides is missed
    code, text = run("elect", "--backend", "memory://x", "name", "jobs")
    said = " ".join(text.replace("│", " ").split())  # the message as one line, out of its box
    assert code == 2
    assert "unexpected argument 'name': podkit elect takes options only" in said
    assert "(did you mean --name?)" in said
    code, text = run("validate", "a.yaml", "b.yaml")
    assert code == 2 and "podkit validate takes SPEC and options" in text
