"""The short run config of Prime's hosted RL, read by ``rlbus rl`` alone or mixed with full sections.

Every short key lands on one key of the merged config: :data:`SHORT_KEYS` is the one table,
used by :func:`expand_short_keys` (applied to the merged raw values of files, flags and
environment before validation, so an unknown key is still an error) and by docs/config.md.
Short and full keys are one config: a value given both ways must agree, whichever file or flag
it comes from, or the command stops naming both. A config that uses a short key also gets its
context length derived (:func:`derive_lengths`): the short form has no ``seq_len``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from rlbus.config import ConfigError, ServiceConfig
from rlbus.config.loader import resolve_key
from rlbus.model_path import position_limit
from rlbus.services.inference.config import InferenceConfig
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.orchestrator.config import OrchestratorConfig

SECTIONS = {"orchestrator": OrchestratorConfig, "inference": InferenceConfig, "monitor": MonitorConfig}
"""The sections the table's full keys are in."""


@dataclass(frozen=True)
class ShortKey:
    """One row of the table: a short key and the full key it sets."""

    short: str
    """Dotted short key; ``x.*`` maps every key of the table ``[x]`` under ``full``."""
    full: str
    """Dotted key of the merged ``rl`` config (``y.*``: the table the keys land in)."""
    note: str = ""
    """What the docs say about the mapping."""
    times: str | None = None
    """Full key whose value multiplies the short value (a count per example becomes one per rollout)."""
    implies: tuple[str, Any] | None = None
    """(full key, value) set too, unless given."""
    drop_item_keys: tuple[str, ...] = ()
    """Keys removed from each item of a short list (they have no rlbus field)."""
    secret: bool = False
    """Never shown in messages."""
    short_form: bool = True
    """Using the key makes a config short (its lengths are then derived); False for prime-rl's
    names that a full config takes too."""


SHORT_KEYS: tuple[ShortKey, ...] = (
    ShortKey("rollouts_per_example", "orchestrator.rollouts_per_example", "rollouts per example (group size)"),
    ShortKey("orchestrator.group_size", "orchestrator.rollouts_per_example", "prime-rl's name for the group size",
             short_form=False),
    ShortKey("batch_size", "orchestrator.batch_size",
             "examples per step; `orchestrator.batch_size` counts rollouts, so it is set to "
             "batch_size x rollouts_per_example", times="orchestrator.rollouts_per_example"),
    ShortKey("sampling.*", "orchestrator.sampling.*",
             "`max_tokens`, `temperature` (>= 0; training needs > 0), `top_p`"),
    ShortKey("env", "orchestrator.train.env",
             "`[[env]]` items: `id`, `args`, `ratio`; `name` (a display name) has no rlbus field and is dropped",
             drop_item_keys=("name",)),
    ShortKey("eval.*", "orchestrator.eval.*",
             "`interval`, `[[eval.env]]` (`id`, `args`, `num_examples`, `rollouts_per_example`, `temperature`, `name`)"),
    ShortKey("wandb", "monitor.wandb.enabled", "`wandb = true` (TOML); `--wandb` / `--no-wandb` on the command line",
             short_form=False),
    ShortKey("wandb.*", "monitor.wandb.*",
             "`project`, `entity`, `name` (also `enabled`, `mode`); any of them enables W&B unless it is "
             "disabled explicitly", implies=("monitor.wandb.enabled", True), short_form=False),
    ShortKey("wandb_api_key", "monitor.wandb.api_key",
             "`--wandb-api-key KEY`, or the environment variable `WANDB_API_KEY` (below files and flags); "
             "written redacted", secret=True, short_form=False),
)  # fmt: skip

FLAG_ALIASES = {
    "--wandb": "--wandb.enabled",
    "--no-wandb": "--no-wandb.enabled",
    "--ckpt": "--trainer.ckpt.enabled",
    "--orchestrator.prime-monitor": "--prime_platform={}",
}
"""prime-rl's bare flags, rewritten by ``rlbus rl`` before parsing (:func:`rewrite_flags`). ``--ckpt``:
``rlbus rl`` checkpoints by default (``ckpt.interval`` = 1), the flag enables the trainer's explicitly.
``--orchestrator.prime-monitor``: the Prime platform with its defaults (an empty ``[prime_platform]``)."""


def rewrite_flags(argv: list[str], aliases: Mapping[str, str] = FLAG_ALIASES) -> list[str]:
    """``argv`` with ``aliases`` replaced (their ``_`` and ``-`` spellings alike). An alias that sets a whole
    table (``--x={}``) moves to the front: a later table value would replace the keys that flags such as
    ``--x.key v`` set before it, while a table given first only gains them."""
    spelled = {key.replace("_", "-"): value for key, value in aliases.items()}
    args = [spelled.get(arg.replace("_", "-"), arg) if arg.startswith("--") else arg for arg in argv]
    tables = [arg for arg in args if arg.endswith("={}") and arg in spelled.values()]
    return [*dict.fromkeys(tables), *(arg for arg in args if arg not in tables)]

DERIVED_NOTE = (
    "In a config that uses any of "
    + ", ".join(f"`{row.short.removesuffix('.*')}`" for row in SHORT_KEYS if row.short_form)
    + " (a short config), the context length is derived where not given: `inference.max_model_len` = "
    "the model folder's `max_position_embeddings` (at most "
    f"{InferenceConfig.model_fields['max_model_len'].default}), and `orchestrator.seq_len` (packed row "
    "length) = `inference.max_model_len`."
)
MISSING = object()


@cache
def short_keys() -> dict[str, Any]:
    """Dotted short key -> annotation of its target, for flags and environment variables."""
    keys = {}
    for row in SHORT_KEYS:
        short, (section, *rest) = row.short.removesuffix(".*"), row.full.removesuffix(".*").split(".")
        if row.short.endswith(".*") or short not in keys:  # `wandb` is a table on the command line
            keys[short] = resolve_key(SECTIONS[section], rest)  # every target is in a section
    return keys


def expand_short_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every short key replaced by its full key; a ConfigError when a key is given both
    ways with different values."""
    values = deepcopy(dict(values))
    origin: dict[str, str] = {}  # full key -> "short key = value" that set it
    short_form = False
    for row in SHORT_KEYS:
        taken = _take(values, row)
        short_form = short_form or (bool(taken) and row.short_form)
        for short, full, value in taken:
            shown = "(secret)" if row.secret else repr(value)
            if row.times is not None:
                count, per = _count(short, value), _count(row.times, _get(values, row.times, _default(row.times)))
                value, shown = count * per, f"{count} (x {row.times} {per} = {count * per})"
            _put(values, full, value, f"{short} = {shown}", origin, row.secret)
        if taken and row.implies and _get(values, row.implies[0]) is MISSING:
            _set(values, *row.implies)
    if short_form:
        derive_lengths(values)
    return values


def derive_lengths(values: dict[str, Any]) -> None:
    """Fill ``inference.max_model_len`` (from the model folder) and ``orchestrator.seq_len`` where not given."""
    default = _default("inference.max_model_len")
    if _get(values, "inference.max_model_len") is MISSING:
        limit = model_length_limit(str(values.get("model", ServiceConfig.model_fields["model"].default)))
        if limit is not None:
            _set(values, "inference.max_model_len", min(limit, default))
    if _get(values, "orchestrator.seq_len") is MISSING:
        _set(values, "orchestrator.seq_len", _get(values, "inference.max_model_len", default))


def model_length_limit(model: str) -> int | None:
    """``max_position_embeddings`` of a local model folder's config.json; None when there is none."""
    try:
        hf_config = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return position_limit(hf_config)


def _take(values: dict[str, Any], row: ShortKey) -> list[tuple[str, str, Any]]:
    """Remove ``row``'s short key(s) from ``values``: (short key, full key, value) for each."""
    if row.short.endswith(".*"):
        prefix, full_prefix = row.short[:-2], row.full[:-2]
        if not isinstance(values.get(prefix), Mapping):
            return []
        table = values.pop(prefix)
        return [(f"{prefix}.{key}", f"{full_prefix}.{key}", value) for key, value in table.items()]
    value = _get(values, row.short)
    if value is MISSING or (isinstance(value, Mapping) and "." not in row.short):
        return []  # a table under a name that is also a scalar short key: the ``x.*`` row takes it
    _pop(values, row.short)
    if row.drop_item_keys and isinstance(value, list):
        value = [{k: v for k, v in item.items() if k not in row.drop_item_keys} if isinstance(item, Mapping) else item
                 for item in value]  # fmt: skip
    return [(row.short, row.full, value)]


def _put(values: dict[str, Any], full: str, value: Any, given: str, origin: dict[str, str], secret: bool) -> None:
    """Set ``full`` to ``value`` (``given``: the short key and value, as the message shows them)."""
    found = _get(values, full)
    if found is not MISSING and not _same(found, value):
        before = origin.get(full, f"{full} = {'(another secret)' if secret else repr(found)}")
        raise ConfigError(
            f"{given} but {before}: the same setting given two ways with different values; keep one of them"
        )
    _set(values, full, value)
    origin[full] = given


def _same(a: Any, b: Any) -> bool:
    # Flags arrive as strings for pydantic to coerce: "16" from the command line equals 16 from a file.
    return a == b or str(a).lower() == str(b).lower()


def _count(key: str, value: Any) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if isinstance(value, bool) or count < 1 or str(count) != str(value).strip():
        raise ConfigError(f"{key} = {value!r}: must be a whole number of at least 1")
    return count


def _default(full: str) -> Any:
    section, _, key = full.partition(".")
    return SECTIONS[section].model_fields[key].default


def _get(values: Mapping[str, Any], dotted: str, default: Any = MISSING) -> Any:
    target: Any = values
    for part in dotted.split("."):
        if not isinstance(target, Mapping) or part not in target:
            return default
        target = target[part]
    return target


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(values.get(part), dict):
            values[part] = dict(values.get(part) or {})
        values = values[part]
    values[last] = value


def _pop(values: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        values = values[part]
    del values[last]


def markdown_short_table() -> str:
    """The docs section: :data:`SHORT_KEYS` as a table, the flags, the derived lengths."""
    lines = [
        "## Short run config (Prime's hosted RL)", "",
        "`rlbus rl` also reads the short config of Prime's hosted RL, alone or mixed with full sections "
        "(`rlbus init` prints one). Each short key sets one full key; a value given both ways must agree, "
        "or the command stops (exit code 2) naming both. " + DERIVED_NOTE, "",
        "| short key | full key | note |", "|---|---|---|",
    ]  # fmt: skip
    lines += [f"| `{row.short}` | `{row.full}` | {row.note} |" for row in SHORT_KEYS]
    lines += [
        "",
        "Flags: "
        + ", ".join(f"`{flag}` = `{full}`" for flag, full in FLAG_ALIASES.items())
        + "; `--wandb.project/.entity/.name` as in the table; `--ckpt.keep-interval`, `--ckpt.weights-only` and `--ckpt.save-async` are "
        "`ckpt.keep_interval`, `ckpt.weights_only` and `ckpt.save_async`.",
    ]
    return "\n".join(lines) + "\n"
