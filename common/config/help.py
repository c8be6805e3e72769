"""``--help`` text of a config-driven command, generated from field docstrings."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

from pydantic import BaseModel

from rlbus.config.base import ServiceConfig
from rlbus.config.docs import field_rows


def usage_text(command: str, cls: type[BaseModel], summary: str, flags: Mapping[str, str] | None = None) -> str:
    """The help of ``rlbus <command>``; ``flags`` are options the command takes besides its config keys."""
    lines = [
        f"usage: rlbus {command} [@ config.toml ...] [--key value ...] [--flag | --no-flag] [--dry-run]",
        "",
        summary,
        "",
        "Sources, highest first: --options, @ TOML files (merged left to right),",
        "RLBUS_<SECTION>__<KEY> environment variables, defaults.",
        "",
        "options:",
        "  --dry-run  write the resolved config(s) to <output_dir>/configs/ and exit",
    ]
    for flag, text in (flags or {}).items():
        lines += [f"  {flag}", *_wrap(text)]
    shared = shared_keys(cls)
    if shared:
        lines += _wrap(f"Shared fields ({', '.join(ServiceConfig.SHARED_FIELDS)}) are set once at the top level; "
                       f"every section takes them from there, so they are listed once.", indent=2)
    hidden = [*shared, *getattr(cls, "HELP_HIDDEN", ())]  # keys set through others: listed once, there
    for key, type_name, default, description in field_rows(cls):
        if type_name == "table" or any(key == s or key.startswith(s + ".") for s in hidden):
            continue
        option = "--" + key.replace("_", "-")
        default_text = ", required" if default == "required" else f", default {default}" if default else ""
        lines.append(f"  {option} ({type_name.replace(chr(92), '')}{default_text})")
        lines += _wrap(description)
    return "\n".join(lines) + "\n"


def shared_keys(cls: type[BaseModel]) -> list[str]:
    """``<section>.<field>`` of each shared field inside each service section of ``cls``: the merged
    ``rl`` config refuses them there (they come from the top level), so help lists them once."""
    keys = []
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, ServiceConfig):
            keys += [f"{name}.{shared}" for shared in ServiceConfig.SHARED_FIELDS]
    return keys


def _wrap(text: str, indent: int = 6) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), 96, initial_indent=" " * indent, subsequent_indent=" " * indent)
