"""``--help`` text of a config-driven command, generated from field docstrings."""

from __future__ import annotations

import textwrap

from pydantic import BaseModel

from rlbus.config.docs import field_rows


def usage_text(command: str, cls: type[BaseModel], summary: str) -> str:
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
    for key, type_name, default, description in field_rows(cls):
        if type_name == "table":
            continue
        option = "--" + key.replace("_", "-")
        head = f"  {option} ({type_name.replace(chr(92), '')}{', default ' + default if default else ''})"
        lines.append(head)
        lines += textwrap.wrap(" ".join(description.split()), 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"
