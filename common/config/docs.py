"""Generate ``docs/config.md`` from the config classes' field docstrings."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from rlbus.config.base import Secret


def field_rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf field, depth first."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        if nested is not None and not _is_list(field.annotation):
            yield key, "table", "", field.description or ""
            yield from field_rows(nested, key + ".")
        else:
            yield key, _type_name(field.annotation), _default(field), field.description or ""


def undocumented_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Keys whose field has no description (the docs test requires none)."""
    missing = []
    for name, field in model.model_fields.items():
        if not (field.description or "").strip():
            missing.append(prefix + name)
        nested = _nested_model(field.annotation)
        if nested is not None:
            missing += undocumented_fields(nested, f"{prefix}{name}.")
    return missing


def markdown_table(title: str, intro: str, model: type[BaseModel]) -> str:
    lines = [f"## {title}", "", intro, "", "| key | type | default | description |", "|---|---|---|---|"]
    for key, type_name, default, description in field_rows(model):
        text = " ".join(description.split()).replace("|", "\\|")
        lines.append(f"| `{key}` | {type_name} | {default} | {text} |")
    return "\n".join(lines) + "\n"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Annotated:  # validators and serializers are no type
        name = _type_name(typing.get_args(annotation)[0])
        return f"{name} (secret)" if annotation == Secret else name
    if isinstance(annotation, type) and not typing.get_args(annotation):
        name = annotation.__name__
    else:
        name = str(annotation).replace("typing.", "").replace("pathlib.", "")
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            name = " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    return name.replace("NoneType", "None")


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} item(s)"
    return f"`{value!r}`".replace("|", "\\|")
