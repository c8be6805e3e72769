"""How far a run is, read from its run folder: the last step and the latest reward.

The monitor appends ``steps.jsonl`` (one row per step) and ``metrics.jsonl`` (one row per service
report) as the run goes (:mod:`rlbus.run_files`); only their ends are read, so a long run's
files cost no more than a short one's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from rlbus.run_files import METRICS_FILE, STEPS_FILE

TAIL_BYTES = 256 * 1024
REWARD = "reward/all/mean"


class Progress(NamedTuple):
    step: int | None
    """Last step the monitor recorded, None before the first."""
    reward: float | None
    """Latest ``reward/all/mean`` the orchestrator reported."""


def read_progress(output_dir: Path) -> Progress:
    step = None
    for row in tail_rows(output_dir / STEPS_FILE):
        if isinstance(row.get("step"), int):
            step = row["step"]
            break
    reward = None
    for row in tail_rows(output_dir / METRICS_FILE):
        if row.get("service") == "orchestrator" and isinstance(row.get(REWARD), int | float):
            reward = float(row[REWARD])
            break
    return Progress(step, reward)


def tail_rows(path: Path, num_bytes: int = TAIL_BYTES) -> Iterator[dict[str, Any]]:
    """The JSON objects among the last ``num_bytes`` of ``path``, newest first; a cut-off line is skipped."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - num_bytes))
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return
    for line in reversed(text.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield row
