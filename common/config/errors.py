"""Config errors worded for humans: which key, which value, what to do."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config could not be built; the message says why. CLIs exit with code 2."""


def unknown_key_message(path: str, key: str, known: Sequence[str]) -> str:
    message = f"unknown key '{path}'"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        message += f" (did you mean '{close[0]}'?)"
    return message


def format_validation_error(exc: ValidationError, cls: type[BaseModel]) -> str:
    lines = [f"invalid {cls.__name__} ({exc.error_count()} problem(s)):"]
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            known = _field_names_at(cls, error["loc"][:-1])
            lines.append(f"  {unknown_key_message(path, str(error['loc'][-1]), known)}")
        elif error["type"] == "value_error":
            lines.append(f"  {path or '<root>'}: {error['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {path or '<root>'}: {error['msg']} (got {_short(error.get('input'))})")
    return "\n".join(lines)


def _field_names_at(cls: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None:
            return []
    return list(model.model_fields)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
