"""YAML loading that remembers where every value came from (file, line, column)."""

from __future__ import annotations

import difflib
import os
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

import pydantic
import yaml

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Position:
    """A place in a source file; line and column count from 1."""

    line: int
    column: int


class YAMLSyntaxError(ValueError):
    """The text is not valid YAML; carries the position of the fault."""

    def __init__(self, message: str, position: Position | None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


def _pos(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


class _Builder:
    def __init__(self) -> None:
        self.positions: dict[Path, Position] = {}
        self._constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.positions[path] = _pos(node)
        if isinstance(node, yaml.MappingNode):
            self._constructor.flatten_mapping(node)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str | int | float | bool) and key is not None:
                    raise YAMLSyntaxError("mapping keys must be scalars", _pos(key_node))
                if key in out:
                    raise YAMLSyntaxError(f"duplicate key {key!r}", _pos(key_node))
                child = (*path, key if isinstance(key, str | int) else str(key))
                out[key] = self.build(value_node, child)
                self.positions[child] = _pos(key_node)  # point at the key, not its value
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._constructor.construct_object(node, deep=True)


def load_with_positions(text: str) -> tuple[Any, dict[Path, Position]]:
    """Parse one YAML document; return the data and a map from path to position."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Position(mark.line + 1, mark.column + 1) if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise YAMLSyntaxError(problem, where) from exc
    except yaml.YAMLError as exc:
        raise YAMLSyntaxError(str(exc), None) from exc
    if node is None:
        return None, {}
    builder = _Builder()
    try:
        data = builder.build(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = Position(mark.line + 1, mark.column + 1) if mark else None
        raise YAMLSyntaxError(exc.problem or "invalid YAML", where) from exc
    return data, builder.positions


def nearest_position(positions: dict[Path, Position], path: Path) -> Position | None:
    """The position of `path`, or of its closest ancestor that has one."""
    p = tuple(path)
    while True:
        if p in positions:
            return positions[p]
        if not p:
            return None
        p = p[:-1]


class ConfigFileError(ValueError):
    """A config file that cannot be used: each line of `str()` is one problem, as
    `file:line:column: path: message`."""


def format_path(loc: Path) -> str:
    """A data path as written in messages: `pods[0].containers[1].with`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _at(file: str, position: Position | None) -> str:
    return f"{file}:{position.line}:{position.column}" if position else file


def load_yaml_file(path: str | os.PathLike[str]) -> tuple[Any, dict[Path, Position]]:
    """Read and parse a YAML file with positions; ConfigFileError names the file (and the
    line of a syntax error)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path}: not UTF-8 text: {exc.reason}") from None
    try:
        return load_with_positions(text)
    except YAMLSyntaxError as exc:
        where = _at(str(path), exc.position)
        raise ConfigFileError(f"{where}: invalid YAML: {exc.message}") from None


def validation_problems(
    exc: pydantic.ValidationError,
    file: str,
    positions: dict[Path, Position],
    model: type[pydantic.BaseModel] | None = None,
) -> ConfigFileError:
    """A ValidationError of data loaded by `load_yaml_file`, as file:line problems; with
    the `model` validated, an unknown field gets the closest known one."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        at = _at(file, nearest_position(positions, loc))
        if err["type"] == "extra_forbidden" and model is not None:
            lines.append(f"{at}: {format_path(loc)}: {unknown_field(model, loc)}")
            continue
        got = err.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float | bool) else ""
        lines.append(f"{at}: {format_path(loc)}: {err['msg']}{shown}")
    return ConfigFileError("\n".join(lines))


def model_in(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The BaseModel class inside an annotation like `Probe | None` or `list[Pod]`."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return model_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, dict):
        args = typing.get_args(annotation)
        for arg in args[-1:] if origin is dict else args:
            found = model_in(arg)
            if found is not None:
                return found
    return None


def model_at(
    root: type[pydantic.BaseModel], loc: tuple[str | int, ...]
) -> type[pydantic.BaseModel] | None:
    """The model of the mapping at `loc` under `root` (None where it is not one)."""
    model: type[pydantic.BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = next(
            (f for n, f in model.model_fields.items() if n == part or f.alias == part), None
        )
        if field is None:
            return None
        model = model_in(field.annotation)
    return model


def did_you_mean(word: str, choices: list[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_field(root: type[pydantic.BaseModel], loc: tuple[str | int, ...]) -> str:
    """What to say of the unknown field at `loc`: the closest known name, and the known."""
    model = model_at(root, loc[:-1])
    name = loc[-1]
    if model is None:
        return f"unknown field '{name}'"
    known = [f.alias or n for n, f in model.model_fields.items()]
    return f"unknown field '{name}'{did_you_mean(str(name), known)}; expected one of: " + ", ".join(
        known
    )
