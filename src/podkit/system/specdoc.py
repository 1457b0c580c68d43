"""The spec reference, docs/spec.md, generated from the spec models.

`reference()` is the Markdown: what a spec is, a minimal one, then one table per model in
the order a reader meets them (the spec, its backends, pods, containers, probes,
services, then the fields the patterns' hooks add), each field with its type in words,
its default, its description and what it becomes on Kubernetes (`FIELDS`). Regenerate
with `python -m podkit.system.specdoc > docs/spec.md`; tests/test_specdoc.py fails when
the file and the models differ.
"""

from __future__ import annotations

import re
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from podkit.contract import pod_hooks, service_hooks
from podkit.spectypes import Name, Port, PortRef, Text, Unit
from podkit.system.components import command_words, known_components
from podkit.system.k8s import FIELDS
from podkit.system.spec import BACKEND_SCHEMES, Container, Probe, Spec
from podkit.system.specmodels import summary
from podkit.yamlpos import model_in

REGENERATE = ".venv/bin/python -m podkit.system.specdoc > docs/spec.md"

EXAMPLE = """\
name: hello
pods:
  - name: web
    replicas: 2
    containers:
      - name: app
        command: [python3, -m, http.server, "8080", --bind, "$(POD_IP)"]
        ports: {http: 8080}
        readiness: {http: {path: /, port: http}}
services:
  - name: web
    port: 8000
    pods: web
    target: http
"""

# What each URL scheme of `backends:` is (every one of BACKEND_SCHEMES needs a line).
SCHEMES = {
    "memory": "`memory://NAME`: in the memory of the process that opens it, so each "
    "program has its own: for tests",
    "sqlite": "`sqlite:///path.db`: a file, shared by the processes of one machine (the "
    "embedded default)",
    "redis": "`redis://host:port/db`: a Redis server, shared across machines",
    "rediss": "`rediss://host:port/db`: the same over TLS",
    "nats": "`nats://host:port[/store]`: NATS JetStream, shared across machines",
    "etcd": "`etcd://host:port`: etcd, a key-value store only (elections, membership)",
    "k8s": "`k8s://NAMESPACE`: Kubernetes Leases, for elections only",
}

CONVENTIONS = """\
- An unknown field is an error that lists the known ones.
- A **name** is a DNS label: lower-case letters, digits and `-`, starting and ending
  with a letter or digit, at most 63 characters. Pods, containers, services, ports,
  volumes and backends are named so.
- **text** takes numbers and booleans as text: `8080` and `"8080"` are the same.
- Numbers of **seconds** may have fractions; where Kubernetes counts whole seconds they
  are rounded up.
- `$(VAR)` in `command`, `args`, `env` and `with` expands as on Kubernetes (`$$` is a
  `$`). Containers see `POD_IP`, `POD_NAME`, `POD_NAMESPACE`, `REPLICA`, `PORT_<NAME>`,
  `VOLUME_<NAME>`, `PODKIT_BACKEND_<NAME>` and `<SERVICE>_SERVICE_HOST`/`_PORT`.
- **not set** as a default: the field is absent; its description says what that means.
"""


@dataclass
class Section:
    """One table of the reference: a model, at its path (`pods[].containers[]`)."""

    path: str  # "" for the spec itself
    model: type[BaseModel]
    used_by: list[str] = field(default_factory=list)  # the fields that hold it

    @property
    def heading(self) -> str:
        return f"`{self.path}`" if self.path else "Top level"

    @property
    def anchor(self) -> str:
        """The anchor GitHub gives the heading."""
        return re.sub(r"[^a-z0-9_-]", "", self.heading.lower().replace(" ", "-"))

    def fields(self) -> Iterator[tuple[str, str, FieldInfo]]:
        """(YAML name, field path, info) of each field, in the model's order."""
        for name, info in self.model.model_fields.items():
            key = info.alias or name
            yield key, f"{self.path}.{key}" if self.path else key, info


def sections() -> list[Section]:
    """Every model of the spec, each once: the system's own first, then the hooks'."""
    hook_paths = {f"pods[].{h.key}" for h in pod_hooks()}
    hook_paths |= {f"services[].{h.key}" for h in service_hooks()}
    own: list[Section] = []
    hooks: list[Section] = []
    seen: dict[type[BaseModel], Section] = {}

    def walk(section: Section, out: list[Section]) -> None:
        out.append(section)
        seen[section.model] = section
        for _, path, info in section.fields():
            sub = model_in(info.annotation)
            if sub is None:
                continue
            if sub in seen:
                seen[sub].used_by.append(path)
                continue
            many = typing.get_origin(info.annotation) in (list, dict)
            where = "probe" if sub is Probe else f"{path}[]" if many else path
            walk(Section(where, sub, [path]), hooks if path in hook_paths else out)

    walk(Section("", Spec), own)
    return own + hooks


def fields() -> Iterator[tuple[str, FieldInfo]]:
    """(path, info) of every field of every model of the spec."""
    for section in sections():
        for _, path, info in section.fields():
            yield path, info


# -- a field's type in words ----------------------------------------------------------------


def _split(tp: Any, meta: tuple[Any, ...] = ()) -> tuple[Any, tuple[Any, ...]]:
    """A type without its `Annotated` layers, and their constraints (`Field(...)` opened)."""
    while typing.get_origin(tp) is Annotated:
        tp, *more = typing.get_args(tp)
        for m in more:
            meta += tuple(m.metadata) if isinstance(m, FieldInfo) else (m,)
    return tp, meta


_ALIASES = ((Name, "name", "names"), (Text, "text", "text"), (Port, "port", "ports"))


def _number(value: Any) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _bounds(meta: tuple[Any, ...]) -> str:
    """` from 0 to 250`, `, 1 or more`, `, more than 0`; '' without bounds."""
    low = next((m for m in meta if isinstance(m, at.Ge | at.Gt)), None)
    high = next((_number(m.le) for m in meta if isinstance(m, at.Le)), None)
    if isinstance(low, at.Ge) and high is not None:
        return f" from {_number(low.ge)} to {high}"
    if isinstance(low, at.Ge):
        return f", {_number(low.ge)} or more"
    if isinstance(low, at.Gt):
        return f", more than {_number(low.gt)}"
    return f", at most {high}" if high is not None else ""


def words(tp: Any, meta: tuple[Any, ...] = (), plural: bool = False) -> str:
    """A type in plain words: `list of text`, `map of name to port 1-65535`..."""
    if tp == PortRef:
        return "ports 1-65535 or port names" if plural else "port 1-65535 or a port name"
    tp, meta = _split(tp, meta)
    for alias, one, many in _ALIASES:
        if (tp, meta) == _split(alias):
            return (many if plural else one) + (" 1-65535" if alias is Port else "")
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        parts = [words(a, plural=plural) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts)
    if origin is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(tp))
    at_least = next((m.min_length for m in meta if isinstance(m, at.MinLen)), 0)
    if origin is list:
        more = f", at least {'one' if at_least == 1 else at_least}" if at_least else ""
        return f"list of {words(typing.get_args(tp)[0], plural=True)}{more}"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"map of {words(key)} to {words(value)}"
    unit = next((m.name for m in meta if isinstance(m, Unit)), None)
    if tp is bool:
        return "true or false"
    if tp is int or tp is float:
        noun = unit or ("integer" if tp is int else "number")
        return noun + ("s" if plural and unit is None else "") + _bounds(meta)
    if tp is str:
        return "text"
    return "any value" if tp is Any else str(tp)


def _type_cell(info: FieldInfo, targets: dict[type[BaseModel], Section]) -> str:
    sub = model_in(info.annotation)
    if sub is not None:
        link = f"[{targets[sub].heading}](#{targets[sub].anchor})"
        if typing.get_origin(info.annotation) is list:
            at_least = any(isinstance(m, at.MinLen) for m in info.metadata)
            return f"list of {link}" + (", at least one" if at_least else "")
        return link
    return words(info.annotation, tuple(info.metadata))


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    if isinstance(value, list | dict):
        return "`[]`" if isinstance(value, list) else "`{}`"
    return f"`{value}`"


# -- Markdown -------------------------------------------------------------------------------


def _text(text: str) -> str:
    """Markdown text: `<` outside code spans escaped (`<NAME>` is no HTML tag)."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _cell(text: str) -> str:
    """Text for a table cell: `|` escaped too."""
    return _text(text.replace("|", "\\|"))


def _wrap(text: str, indent: str = "") -> list[str]:
    """A paragraph, or a list item with `indent` under its first line, at 88 columns."""
    return textwrap.wrap(
        _text(text), 88, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _table(section: Section, targets: dict[type[BaseModel], Section]) -> list[str]:
    rows = list(section.fields())
    kube = any(path in FIELDS for _, path, _ in rows)
    head = ["field", "type", "default", "description", *(["on Kubernetes"] if kube else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, path, info in rows:
        cells = [f"`{key}`", _type_cell(info, targets), _default(info), info.description or ""]
        if kube:
            cells.append(FIELDS.get(path, ""))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _section(section: Section, targets: dict[type[BaseModel], Section]) -> list[str]:
    text = summary(section.model)
    held = [f"`{p}`" for p in section.used_by if p != section.path.removesuffix("[]")]
    if held:
        text += f" Set at {_and(held)}."
    if section.path in FIELDS:
        text += f" On Kubernetes: {FIELDS[section.path]}."
    return [f"## {section.heading}", "", *_wrap(text), "", *_table(section, targets), ""]


def _components() -> list[str]:
    names = [f"`{n}` (`podkit {' '.join(command_words(n))}`)" for n in known_components()]
    text = (
        f"A container's `component` is one of {_and(names)}. Its `with` keys are the "
        "options of that command (`podkit ... --help`)."
    )
    return [*_wrap(text), ""]


def _backends() -> list[str]:
    missing = set(BACKEND_SCHEMES) - set(SCHEMES)
    if missing:
        raise ValueError(f"no words for the backend schemes {sorted(missing)} in SCHEMES")
    users = [f"`{p}`" for p, _ in fields() if p.endswith(".backend")]
    text = (
        "A map of name to URL: the backends the system's programs share. Every container "
        f"finds each URL in `PODKIT_BACKEND_<NAME>`; {_and(users)} name one. `state` is "
        "always there: when the spec does not give it, `podkit up` makes it an SQLite "
        "file, `.podkit/<name>/state.db` beside the spec. On Kubernetes: "
        f"{FIELDS['backends']}. The URLs:"
    )
    return [
        "## `backends`",
        "",
        *_wrap(text),
        "",
        *(f"- {SCHEMES[s]}" for s in BACKEND_SCHEMES),
        "",
    ]


def _intro(all_sections: list[Section]) -> list[str]:
    layout = [
        f"- [{s.heading}](#{s.anchor}): " + ", ".join(f"`{k}`" for k, _, _ in s.fields())
        for s in all_sections
    ]
    layout.insert(1, "- [`backends`](#backends): a name for each backend URL")
    return [
        "# The spec reference",
        "",
        *_wrap(
            "Generated from the models (`src/podkit/system/specmodels.py` and the patterns' "
            "`hooks.py`): edit the models, not this file, then regenerate it:"
        ),
        "",
        "```sh",
        REGENERATE,
        "```",
        "",
        *_wrap(
            "A system spec is one YAML file that names a system's backends, its pods (groups "
            "of containers that share an address and volumes, run as replicas) and its "
            "services (stable ports in front of a pod's ready replicas). `podkit validate "
            "SPEC` checks it, `podkit up SPEC` runs it on one machine and `podkit k8s SPEC` "
            "renders it to Kubernetes manifests. A minimal one:"
        ),
        "",
        "```yaml",
        *EXAMPLE.splitlines(),
        "```",
        "",
        *_wrap(
            "`podkit up` runs two replicas of the app, each on its own address, and serves "
            "them on http://127.0.0.1:8000/."
        ),
        "",
        "The sections below, and the fields of each:",
        "",
        *(line for item in layout for line in _wrap(item, "  ")),
        "",
        "Conventions:",
        "",
        *CONVENTIONS.splitlines(),
        "",
    ]


def reference() -> str:
    """docs/spec.md: the spec reference, from the models."""
    all_sections = sections()
    targets = {s.model: s for s in all_sections}
    lines = _intro(all_sections)
    for section in all_sections:
        lines += _section(section, targets)
        if not section.path:
            lines += _backends()
        if section.model is Container:
            lines += _components()
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(reference(), end="")
