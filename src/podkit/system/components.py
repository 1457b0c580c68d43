"""The registry of podkit components that a spec container may name with `component:`.

A component is a `podkit` subcommand; `with:` becomes its command-line flags.
"""

from __future__ import annotations

import sys
from typing import Any

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


def known_components() -> list[str]:
    """Names a spec may use in `component:`, sorted."""
    return sorted(_REGISTRY)


def to_flags(options: dict[str, Any]) -> list[str]:
    """`{listen: 8443, self_signed: true}` -> `--listen 8443 --self-signed`; lists repeat."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def component_argv(name: str, options: dict[str, Any]) -> list[str]:
    """The full command line that runs component `name` configured by `options`."""
    return [sys.executable, "-m", "podkit", *_REGISTRY[name], *to_flags(options)]
