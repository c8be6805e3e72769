"""The JSON-lines files of a run folder, shared by the monitor (``rlbus rl``) and ``rlbus sft``.

Both write the same names and row shapes, so one reader (a notebook, ``jq``, the
launcher's end-of-run summary) works for either kind of run:

- ``metrics.jsonl``: one line per service report, ``{"step", "service", "replica_id", "time", <metric>: value}``.
- ``steps.jsonl``: one line per step with every service's figures of that step, each named
  ``<service>/<metric>`` (``orchestrator/reward/all/mean``, ``trainer/loss/mean``; a name that
  already starts with its service, ``inference/requests_running``, ``env_worker/tasks_running``,
  is kept as it is), plus
  ``step``, ``time`` (UNIX seconds when written), ``elapsed_s`` (since the run's first report)
  and ``complete`` (false when a step reporter never reported it, e.g. the last step of a
  run that was stopped).

Lines are appended and flushed one by one, so a crash loses nothing already written and
``tail -f`` works. Non-finite numbers are written as ``null``: strict JSON readers reject ``NaN``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

METRICS_FILE, SAMPLES_FILE, EVENTS_FILE, STEPS_FILE = "metrics.jsonl", "samples.jsonl", "events.jsonl", "steps.jsonl"
STEP_ROW_KEYS = ("step", "time", "elapsed_s", "complete")
"""The fixed keys of a ``steps.jsonl`` row; every other key is ``<service>/<metric>``."""

_encoder = msgspec.json.Encoder()


class JsonlWriter:
    """Appends JSON lines to one file, flushing each so readers see whole lines at once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: BinaryIO = path.open("ab")
        self.num_lines = 0

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(_encoder.encode(finite_or_null(record)) + b"\n")
        self._file.flush()
        self.num_lines += 1

    def close(self) -> None:
        self._file.close()


def step_row(step: int, time: float, elapsed_s: float, complete: bool,
             figures: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:  # fmt: skip
    """One ``steps.jsonl`` row from ``{service: {metric: value}}``."""
    row: dict[str, Any] = {"step": step, "time": time, "elapsed_s": elapsed_s, "complete": complete}
    for service in sorted(figures):
        row |= {figure_name(service, name): value for name, value in sorted(figures[service].items())}
    return row


def figure_name(service: str, name: str) -> str:
    """``<service>/<name>``, unless ``name`` already says its service (inference and env-workers
    prefix their own metrics, ``env_worker/`` with an underscore)."""
    own = (f"{service}/", f"{service.replace('-', '_')}/")
    return name if name.startswith(own) else f"{service}/{name}"


def finite_or_null(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path`` (none when it is missing); a line that does not parse (cut off
    by a crash, or still being written by a running run) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def run_folder_problem(output_dirs: Sequence[Path]) -> str | None:
    """Why a folder given to a reader of finished runs (``rlbus plot``, ``rlbus dashboard``) is not a
    run folder, or None."""
    for output_dir in output_dirs:
        if not output_dir.is_dir():
            return f"{output_dir} is not a folder (give a run's output_dir)"
        if not any((output_dir / name).exists() for name in (STEPS_FILE, METRICS_FILE)):
            return f"{output_dir} has no {STEPS_FILE} or {METRICS_FILE}: is it a run's output_dir?"
    return None
