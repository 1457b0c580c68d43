"""How `podkit` commands print their help and their usage errors.

Plain text as wide as click's help allows (the terminal's width less 2, at most 78):

    Usage: podkit lb [OPTIONS]
    Balance HTTP/1.1 requests over upstreams: keep-alive, streaming, WebSocket.

    Upstreams and membership:
      --upstream              [http://]HOST:PORT[,weight=N]; repeat for each.
      --policy                round-robin, weighted, least-requests,
                              consistent-hash. [default: round-robin]
    ...
    Example: podkit lb --upstream 10.0.0.1:8000 --upstream 10.0.0.2:8000,weight=2
    Docs:    docs/lb.md

Options are shown by name alone (what a value is, the help says: no type tags), in the
groups their `rich_help_panel` names, each with its default; `show_default="text"` says
what a None default means. A pair of boolean flags shows as `--[no-]name`; a name too
wide for its column is split after its `/`, or has its help start on the next line:
nothing is cut. The groups follow each other with no blank line between them, so that
the forty options of `podkit lb` fit one screen. `--help` itself is not listed: the
top-level help says how to ask a command for its own.

A command made by an `App` takes no stray word: `podkit lb stray` is a usage error that
says the command takes options only, not "No such command".
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import typer
from typer import _click
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import CommandFunctionType

NAME_COLUMN = 24  # the widest option name that keeps its help on the same line
GAP = 2  # between an option's name and its help
INDENT = 2


def epilog(*example: str, docs: str) -> str:
    """A command's closing lines: one example (a long one in several lines, continued
    with a backslash) and the page of the docs that tells more."""
    shown = " \\\n           ".join(example)
    return f"Example: {shown}\nDocs:    {docs}"


def option_name(param: _click.Parameter) -> str:
    """How an option or argument is named in the help: `-o, --output`, `--[no-]drain`,
    `--reuse-port/--shared-socket`, or an argument's `SPEC`."""
    if not isinstance(param, TyperOption):
        name = param.metavar or (param.name or "").upper()
        return name + ("..." if param.nargs != 1 else "")
    names = ", ".join(sorted(param.opts, key=lambda o: (o.startswith("--"), o)))
    off = param.secondary_opts
    if len(param.opts) == 1 and off == ["--no-" + param.opts[0][2:]]:
        return "--[no-]" + param.opts[0][2:]
    return "/".join([names, *off])


def usage_pieces(command: _click.Command, ctx: _click.Context) -> list[str]:
    """What follows the command's name on its usage line: `[OPTIONS] SPEC [NAME]`."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if isinstance(param, TyperArgument):
            name = option_name(param)
            pieces.append(name if param.required else f"[{name}]")
    if isinstance(command, TyperGroup):
        pieces.append(command.subcommand_metavar)
    return pieces


def _number(value: Any) -> str:
    """A default as typed on the command line: 2 for 2.0, 0.5 as is."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def default_text(param: _click.Parameter, ctx: _click.Context) -> str | None:
    """What the help says of a parameter's default: `show_default` when it is a text
    (what None means), else the value; None when there is nothing to say (a required
    parameter, a flag that is off unless given, an option with no value by default)."""
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        return shown
    if param.required or shown is False:
        return None
    value = param.get_default(ctx, call=False)
    if isinstance(param, TyperOption) and param.is_bool_flag:
        if not param.secondary_opts:
            return None
        if option_name(param).startswith("--[no-]"):
            return "on" if value else "off"
        return (param.opts if value else param.secondary_opts)[0]
    if value is None or value == [] or value == ():
        return None
    if isinstance(value, list | tuple):
        return ", ".join(_number(v) for v in value)
    return _number(value)


def option_help(param: _click.Parameter, ctx: _click.Context) -> str:
    """An option's help with its default, environment variable and [required]."""
    parts = [" ".join((getattr(param, "help", None) or "").split())]
    default = default_text(param, ctx)
    if default is not None:
        parts.append(f"[default: {default}]")
    envvar = param.envvar if getattr(param, "show_envvar", True) else None
    if isinstance(envvar, str):
        parts.append(
            f"[required, or env var {envvar}]" if param.required else f"[env var: {envvar}]"
        )
    elif param.required:
        parts.append("[required]")
    return " ".join(p for p in parts if p)


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters, never breaking a word or an option name."""
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]


def _rows(rows: list[tuple[str, str]], name_width: int, width: int) -> Iterator[str]:
    """Two columns: the names, and their help wrapped beside them. A name too wide for
    its column is split after each `/` (`--reuse-port/`, `--shared-socket`) down the
    lines of its help; a part still too wide has the help start on the next line."""
    column = INDENT + name_width + GAP
    for name, text in rows:
        helps = _wrap(text, max(width - column, 20))
        names = [name] if len(name) <= name_width else name.replace("/", "/\n").split("\n")
        if any(len(n) > name_width for n in names):
            yield from (" " * INDENT + n for n in names)
            names = []
        for i in range(max(len(names), len(helps))):
            left = names[i] if i < len(names) else ""
            right = helps[i] if i < len(helps) else ""
            yield f"{' ' * INDENT}{left:<{name_width}}{' ' * GAP}{right}".rstrip()


def _paragraphs(text: str, width: int) -> Iterator[str]:
    """A command's description, each paragraph rewrapped; a paragraph opened with
    `\\b` (click's mark) keeps its lines."""
    for i, paragraph in enumerate(inspect.cleandoc(text).partition("\f")[0].split("\n\n")):
        if i:
            yield ""
        if paragraph.startswith("\b"):
            yield from paragraph[1:].strip("\n").splitlines()
        else:
            yield from _wrap(" ".join(paragraph.split()), width)


def _groups(command: _click.Command, ctx: _click.Context) -> dict[str, list[_click.Parameter]]:
    """The command's arguments and options, by the group each is shown in: the
    arguments first, then each group in the order of its first option (an option of no
    group is under "Options")."""
    groups: dict[str, list[_click.Parameter]] = {"Arguments": []}
    help_option = command.get_help_option(ctx)
    for param in command.get_params(ctx):
        if param is help_option or getattr(param, "hidden", False):
            continue
        fallback = "Arguments" if isinstance(param, TyperArgument) else "Options"
        panel = getattr(param, "rich_help_panel", None) or fallback
        groups.setdefault(panel, []).append(param)
    return {name: params for name, params in groups.items() if params}


def _subcommands(command: _click.Command, ctx: _click.Context) -> list[tuple[str, str]]:
    """A group's commands with the first paragraph of each one's help."""
    if not isinstance(command, TyperGroup):
        return []
    rows = []
    for name in command.list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is not None and not sub.hidden:
            first = inspect.cleandoc(sub.short_help or sub.help or "").split("\n\n")[0]
            rows.append((name, " ".join(first.split())))
    return rows


def write_help(command: _click.Command, ctx: _click.Context, out: _click.HelpFormatter) -> None:
    """The whole help of `command`: usage, description, its options by group (or its
    commands), then its epilog (an example and the docs) as written."""
    width = out.width
    pieces = " ".join(usage_pieces(command, ctx))
    lines = _wrap(f"Usage: {ctx.command_path} {pieces}", width)
    if command.help:
        lines += _paragraphs(command.help, width)
    groups = _groups(command, ctx)
    commands = _subcommands(command, ctx)
    names = [option_name(p) for params in groups.values() for p in params]
    names += [name for name, _ in commands]
    name_width = max((len(n) for n in names if len(n) <= NAME_COLUMN), default=0)
    if groups or commands:
        lines.append("")
    for group, params in groups.items():
        lines.append(f"{group}:")
        rows = [(option_name(p), option_help(p, ctx)) for p in params]
        lines += _rows(rows, name_width, width)
    if commands:
        lines += ["Commands:", *_rows(commands, name_width, width)]
    if command.epilog:
        lines += command.epilog.strip("\n").splitlines()
    out.write("\n".join(lines) + "\n")


def _stray(command: _click.Command, ctx: _click.Context, word: str) -> str:
    """The usage error for a word `command` has no place for."""
    args = [option_name(p) for p in command.get_params(ctx) if isinstance(p, TyperArgument)]
    takes = f"{' '.join(args)} and options" if args else "options only"
    message = f"unexpected argument {word!r}: {ctx.command_path} takes {takes}"
    flags = {o for p in command.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}
    if "--" + word in flags:
        message += f" (did you mean --{word}?)"
    return message


class Command(TyperCommand):
    """A `podkit` command: its help as `write_help` prints it; a stray word is a usage
    error that says what the command takes."""

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        write_help(self, ctx, formatter)

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        return usage_pieces(self, ctx)

    def parse_args(self, ctx: _click.Context, args: list[str]) -> list[str]:
        if args and not ctx.allow_extra_args and not ctx.resilient_parsing:
            # before the options are checked: a stray word explains a missing option
            opts, rest, _ = self.make_parser(ctx).parse_args(args=list(args))
            if rest and not opts.get("help"):
                ctx.fail(_stray(self, ctx, rest[0]))
        return super().parse_args(ctx, args)


class Group(TyperGroup):
    """A `podkit` command with subcommands: its help as `write_help` prints it."""

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        write_help(self, ctx, formatter)

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        return usage_pieces(self, ctx)


class App(typer.Typer):
    """A typer app whose groups and commands print their help as `write_help` does.

    An app with one command and no callback is that command: `podkit` mounts it as a
    plain command (`podkit lb --listen ...`), not a group."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", Group)
        kwargs.setdefault("add_completion", False)
        super().__init__(**kwargs)

    def command(
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        return super().command(name, cls=cls or Command, **kwargs)
