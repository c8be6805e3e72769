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
    """One line for one problem (what a CLI prints last); a heading and a line per problem otherwise."""
    problems = [_problem(error, cls) for error in exc.errors(include_url=False)]
    if len(problems) == 1:
        return f"invalid {cls.__name__}: {problems[0]}"
    return "\n".join([f"invalid {cls.__name__} ({len(problems)} problems):", *(f"  {p}" for p in problems)])


def _problem(error: Any, cls: type[BaseModel]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return unknown_key_message(path, str(error["loc"][-1]), _field_names_at(cls, error["loc"][:-1]))
    if error["type"] == "missing":
        return f"{path} is required: give --{path.replace('_', '-')} VALUE, or set it in an @ file"
    if error["type"] == "value_error":
        return f"{path or '<root>'}: {error['msg'].removeprefix('Value error, ')}"
    return f"{path or '<root>'}: {error['msg']} (got {_short(error.get('input'))})"


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
