"""Build a config from defaults, environment, TOML files and CLI flags.

Precedence, highest first: CLI flags (``--orchestrator.batch-size 16``,
``--flag`` / ``--no-flag``), TOML files (``@ a.toml @ b.toml``, deep-merged
left to right), environment variables (``RLBUS_ORCHESTRATOR__BATCH_SIZE``),
defaults. Every mistake raises :class:`ConfigError` naming the key, the bad
value and, for a misspelt key, the closest real one.
"""

from __future__ import annotations

import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from rlbus.config.base import REDACTED
from rlbus.config.errors import ConfigError, format_validation_error, unknown_key_message

ENV_PREFIX = "RLBUS_"
# Variables under the prefix that belong to the scripts, not to any config: scripts/setup_env.sh
# (which venv, which extras), the fuzz tests, and the chaos tests' fault points and audit trails
# (rlbus.faults, rlbus.audit), the home of the run registry (``rlbus run``, RLBUS_HOME), and the
# launcher's pid that ``rlbus rl`` gives its services (rlbus.prime_platform.LAUNCHER_PID_VARIABLE),
# and the GPU count the placement tests pretend (services/run_config/placement.py, tests only).
# Every other RLBUS_ name must be a config key.
TOOL_VARIABLES = frozenset({"RLBUS_VENV", "RLBUS_EXTRAS", "RLBUS_FUZZ_EXAMPLES", "RLBUS_FAULT_POINTS",
                            "RLBUS_AUDIT_DIR", "RLBUS_HOME", "RLBUS_LAUNCHER_PID", "RLBUS_FAKE_GPU_COUNT"})  # fmt: skip
C = TypeVar("C", bound=BaseModel)


def load_config(cls: type[C], argv: Sequence[str], env: Mapping[str, Any] | None = None) -> C:
    """Parse ``argv`` (``@ file.toml`` and ``--key value`` tokens) into ``cls``.

    ``env`` holds values already read from the environment (nested dict);
    by default they are read from ``os.environ`` for ``cls``.
    """
    files, cli = parse_argv(cls, argv)
    merged = env_values(cls, os.environ) if env is None else dict(env)
    for path in files:
        merged = deep_merge(merged, without_redacted(read_toml(path), merged))
    merged = deep_merge(merged, cli)
    expand = getattr(cls, "expand_short_keys", None)
    if expand is not None:  # a config that takes a short form besides its fields (``rlbus rl``)
        merged = expand(merged)
    try:
        return cls(**merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, cls)) from None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` wins; tables are merged key by key, everything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def without_redacted(values: Mapping[str, Any], found: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` less the redacted secrets (:data:`REDACTED`) that ``found`` already holds: a resolved
    config file then takes its secrets from the environment. A placeholder with nothing under it
    stays, for the field to refuse with a message."""
    kept = {}
    for key, value in values.items():
        below = found.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            kept[key] = without_redacted(value, below)
        elif not (value == REDACTED and below is not None):
            kept[key] = value
    return kept


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: '@' takes a TOML file (a run folder's merged "
                          f"config is {path / 'configs' / 'rl.toml'})") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def parse_argv(cls: type[BaseModel], argv: Sequence[str]) -> tuple[list[Path], dict[str, Any]]:
    """Split argv into config files (``@ f`` or ``@f``) and nested CLI overrides."""
    files: list[Path] = []
    overrides: dict[str, Any] = {}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token.startswith("@"):
            name = token[1:]
            if not name:
                if i >= len(tokens):
                    raise ConfigError("'@' must be followed by a config file path")
                name, i = tokens[i], i + 1
            files.append(Path(name))
            continue
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}: expected '@ file.toml' or '--key value'")
        key, has_value, value = token[2:].partition("=")
        parts = _key_parts(key)
        parts, annotation, negated = _resolve_flag(cls, parts)
        if _is_bool(annotation):
            if has_value and negated:
                raise ConfigError(f"--{key} takes no value")
            parsed: Any = (not negated) if not has_value else value
        else:
            if not has_value:
                if i >= len(tokens):
                    raise ConfigError(f"--{key} needs a value")
                value, i = tokens[i], i + 1
            parsed = _parse_value(value, annotation, key)
        _set_nested(overrides, parts, parsed)
    return files, overrides


def env_values(cls: type[BaseModel], environ: Mapping[str, str], prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """Nested values from ``PREFIX<SECTION>__<KEY>`` variables; unknown names are errors."""
    values: dict[str, Any] = {}
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith(prefix) or upper == prefix or upper in TOOL_VARIABLES:
            continue
        parts = name[len(prefix):].lower().split("__")
        try:
            annotation = resolve_key(cls, parts)
        except ConfigError as exc:
            raise ConfigError(f"environment variable {name}: {exc}") from None
        _set_nested(values, parts, _parse_value(value, annotation, name))
    return values


def resolve_key(cls: type[BaseModel], parts: Sequence[str]) -> Any:
    """The annotation of the field at dotted path ``parts``, or a ConfigError. A class with
    ``short_keys()`` (dotted short key -> annotation) takes those keys too, as its
    ``expand_short_keys`` turns them into fields before validation."""
    model: Any = cls
    annotation: Any = None
    short_keys = getattr(cls, "short_keys", dict)()
    for depth, part in enumerate(parts):
        sub_model = _model_in(annotation) if depth else model
        if sub_model is None:
            raise ConfigError(f"{'.'.join(parts[:depth])} has no sub-keys (got {'.'.join(parts)})")
        fields = sub_model.model_fields
        if part not in fields and ".".join(parts[: depth + 1]) in short_keys:
            annotation = short_keys[".".join(parts[: depth + 1])]
            continue
        if part not in fields:
            prefix = ".".join(parts[:depth])
            shorts = [key.rpartition(".")[2] for key in short_keys if key.rpartition(".")[0] == prefix]
            raise ConfigError(unknown_key_message(".".join(parts[: depth + 1]), part, [*fields, *shorts]))
        annotation = fields[part].annotation
    return annotation


def _resolve_flag(cls: type[BaseModel], parts: list[str]) -> tuple[list[str], Any, bool]:
    """Resolve a key, accepting ``no-`` before its first or last part for booleans."""
    try:
        return parts, resolve_key(cls, parts), False
    except ConfigError as error:
        for index in (len(parts) - 1, 0):
            if parts[index].startswith("no_"):
                stripped = [*parts[:index], parts[index][3:], *parts[index + 1:]]
                try:
                    annotation = resolve_key(cls, stripped)
                except ConfigError:
                    continue
                if _is_bool(annotation):
                    return stripped, annotation, True
        raise error


def _key_parts(key: str) -> list[str]:
    parts = key.replace("-", "_").split(".")
    if not all(parts):
        raise ConfigError(f"--{key} is not a valid option name")
    return parts


def _set_nested(target: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def _unwrap_optional(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _is_bool(annotation: Any) -> bool:
    return _unwrap_optional(annotation) == [bool]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for candidate in _unwrap_optional(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _parse_value(raw: str, annotation: Any, key: str) -> Any:
    """Strings stay strings for pydantic to coerce; lists, tables and models come as JSON."""
    structured = any(
        typing.get_origin(a) in (list, dict, tuple) or a in (list, dict) or _model_in(a)
        for a in _unwrap_optional(annotation)
    )
    if not structured:
        return None if raw.lower() in ("none", "null") and type(None) in typing.get_args(annotation) else raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: {raw!r} is not valid JSON ({exc.msg}); lists and tables are given as JSON") from None
