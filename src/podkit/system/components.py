"""The registry of podkit components that a spec container may name with `component:`.

A component is a `podkit` subcommand; `with:` becomes its command-line flags, so the keys
`with:` accepts are the component's own options (`component_options`).
"""

from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from typing import Any

# `podkit` subcommand -> the module whose `cli` (a typer.Typer) implements it
COMPONENT_MODULES: dict[str, str] = {
    "adapter": "podkit.adapter.component",
    "elect": "podkit.election.component",
    "queue": "podkit.workqueue.component",
    "lb": "podkit.lb.component",
    "sidecar": "podkit.sidecar.component",
    "ambassador": "podkit.ambassador.component",
}

# component name (as in the spec) -> the `podkit` subcommand words that run it
_REGISTRY: dict[str, tuple[str, ...]] = {
    "elect": ("elect",),
    "adapter.logs": ("adapter", "logs"),
    "adapter.health": ("adapter", "health"),
    "adapter.metrics": ("adapter", "metrics"),
    "sidecar.config": ("sidecar", "config"),
    "sidecar.tls": ("sidecar", "tls"),
    "ambassador.split": ("ambassador", "split"),
    "ambassador.broker": ("ambassador", "broker"),
}


def register(name: str, *words: str) -> None:
    """Make `component: name` run `podkit <words...>` (defaults to the name's parts)."""
    _REGISTRY[name] = words or tuple(name.split("."))
    component_options.cache_clear()


def known_components() -> list[str]:
    """Names a spec may use in `component:`, sorted."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class ComponentOption:
    """One command-line option of a component, as a `with:` key."""

    key: str  # the `with:` key: the flag without `--`, `-` as `_`
    flags: tuple[str, ...]  # every long flag that sets it (`--x`, `--no-x`)
    required: bool


@functools.cache
def component_options(name: str) -> dict[str, ComponentOption] | None:
    """The options of component `name`, by `with:` key, read from its command-line
    definition; None when the component or its command is unknown."""
    words = _REGISTRY.get(name)
    module_name = COMPONENT_MODULES.get(words[0]) if words else None
    if words is None or module_name is None:
        return None
    import typer.main

    command: Any = typer.main.get_command(importlib.import_module(module_name).cli)
    for word in words[1:]:
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            return None
    out: dict[str, ComponentOption] = {}
    for param in command.params:
        if param.param_type_name != "option":
            continue
        flags = tuple(f for f in (*param.opts, *param.secondary_opts) if f.startswith("--"))
        primary = next((f for f in param.opts if f.startswith("--")), None)
        if primary is None:
            continue
        key = primary[2:].replace("-", "_")
        out[key] = ComponentOption(key, flags, bool(param.required and not param.envvar))
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
    return [sys.executable, "-m", "podkit", *_REGISTRY[name], *to_flags(options)]
