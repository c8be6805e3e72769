"""Reading JSON-lines files of objects, with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_objects(path: str | Path, required_key: str | None = None) -> list[dict[str, Any]]:
    """One dict per non-blank line; ValueError names ``path:line`` of the first bad one
    (not JSON, not an object, or an object without ``required_key``)."""
    rows = []
    with Path(path).open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} is a {type(row).__name__}, expected a JSON object")  # noqa: TRY004
            if required_key is not None and required_key not in row:
                raise ValueError(f"{path}:{number} must be an object with a {required_key!r}, got {line[:80]!r}")
            rows.append(row)
    return rows
