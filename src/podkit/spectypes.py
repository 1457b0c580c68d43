"""The field types of the system spec, shared by `podkit.system` and the patterns' hooks.

`Model` forbids unknown fields; `Name` is a DNS label; `Text` takes numbers and booleans
as text; `Port`, `PortRef`, `Seconds` and `PositiveSeconds` are bounded numbers. A `Unit`
in a number's annotation says what it counts, for the spec reference (docs/spec.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _scalar_to_str(value: Any) -> Any:
    """Numbers and booleans in commands and env are meant as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _dns_label(value: str) -> str:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise PydanticCustomError(
            "dns_label",
            "'{value}' is not a valid name: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters",
            {"value": value},
        )
    return value


@dataclass(frozen=True)
class Unit:
    """What a number of the spec counts (`seconds`, `bytes`, `percent`); validation
    ignores it, the spec reference reads it."""

    name: str


Text = Annotated[str, BeforeValidator(_scalar_to_str)]
Name = Annotated[str, AfterValidator(_dns_label)]
Port = Annotated[int, Field(ge=1, le=65535)]
PortRef = Port | str
Seconds = Annotated[float, Field(ge=0), Unit("seconds")]
PositiveSeconds = Annotated[float, Field(gt=0), Unit("seconds")]


class Model(BaseModel):
    """Base of every spec model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)
