"""The components a spec container may name with `component:`, as the registered patterns
declare them (`podkit.contract`).

A component is a `podkit` subcommand; `with:` becomes its command-line flags, so the keys
`with:` accepts are the component's own options (`component_options`).
"""

from __future__ import annotations

import functools
import importlib
import sys
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from podkit.contract import patterns


def commands() -> dict[str, str]:
    """`podkit` subcommand -> "module:attribute" of the typer.Typer that implements it."""
    return {p.name: p.cli for p in patterns()}


def command_app(target: str) -> Any:
    """The typer.Typer named by "module:attribute"."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _registry() -> dict[str, tuple[str, ...]]:
    """Component name (as in the spec) -> the `podkit` subcommand words that run it."""
    return {c.name: c.command for p in patterns() for c in p.components}


def known_components() -> list[str]:
    """Names a spec may use in `component:`, sorted."""
    return sorted(_registry())


def command_words(name: str) -> tuple[str, ...]:
    """The `podkit` subcommand words that run component `name`."""
    return _registry()[name]


@dataclass(frozen=True)
class ComponentOption:
    """One command-line option of a component, as a `with:` key."""

    key: str  # the `with:` key: the flag without `--`, `-` as `_`
    flags: tuple[str, ...]  # every long flag that sets it (`--x`, `--no-x`)
    required: bool
    kind: Any = None  # the type the command's signature gives it

    def problem(self, value: Any) -> str | None:
        """Why `value` is not a value of this option, or None when it is one. A text
        holding `$(VAR)` is taken as it is: it is expanded when the component starts."""
        if self.kind is None or value is None:
            return None
        many = typing.get_origin(self.kind) is list
        if isinstance(value, list) and not many:
            return f"option '{self.key}' takes one value, not a list"
        one_kind = typing.get_args(self.kind)[0] if many else self.kind
        for one in value if isinstance(value, list) else [value]:
            if isinstance(one, str) and "$(" in one:
                continue
            if (one_kind is bool) != isinstance(one, bool):
                want = "true or false" if one_kind is bool else "a value, not true or false"
                return f"option '{self.key}' takes {want} (got {one!r})"
            try:  # as the command will read it: from text
                _adapter(one_kind).validate_python(one if one_kind is bool else str(one))
            except ValidationError as exc:
                return f"option '{self.key}': {exc.errors()[0]['msg']} (got {one!r})"
        return None


@functools.cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def _signature(callback: Any) -> dict[str, tuple[Any, Any]]:
    """A command's parameters: name -> (type, typer's OptionInfo)."""
    fn = getattr(callback, "__wrapped__", callback)
    out = {}
    for name, hint in typing.get_type_hints(fn, include_extras=True).items():
        if typing.get_origin(hint) is typing.Annotated:
            kind, *extras = typing.get_args(hint)
            out[name] = (kind, extras[0] if extras else None)
    return out


@functools.cache
def component_options(name: str) -> dict[str, ComponentOption] | None:
    """The options of component `name`, by `with:` key, read from its command-line
    definition; None when the component or its command is unknown."""
    words = _registry().get(name)
    target = commands().get(words[0]) if words else None
    if words is None or target is None:
        return None
    import typer.main

    command: Any = typer.main.get_command(command_app(target))
    for word in words[1:]:
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            return None
    signature = _signature(command.callback)
    out: dict[str, ComponentOption] = {}
    for param in command.params:
        if param.param_type_name != "option":
            continue
        flags = tuple(f for f in (*param.opts, *param.secondary_opts) if f.startswith("--"))
        primary = next((f for f in param.opts if f.startswith("--")), None)
        if primary is None:
            continue
        key = primary[2:].replace("-", "_")
        required = bool(param.required and not param.envvar)
        kind, _ = signature.get(param.name or "", (None, None))
        out[key] = ComponentOption(key, flags, required, kind)
    return out


def option_flag(key: str) -> str:
    """The flag a `with:` key becomes: `self_signed` -> `--self-signed`."""
    return "--" + key.replace("_", "-")


def to_flags(options: dict[str, Any]) -> list[str]:
    """`{listen: 8443, self_signed: true}` -> `--listen 8443 --self-signed`; lists repeat."""
    argv: list[str] = []
    for key, value in options.items():
        flag = option_flag(key)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def component_argv(name: str, options: dict[str, Any]) -> list[str]:
    """The full command line that runs component `name` configured by `options`."""
    return [sys.executable, "-m", "podkit", *command_words(name), *to_flags(options)]
