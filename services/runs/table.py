"""What ``rlbus list`` shows: one row per run, as JSON-ready dicts and as aligned columns."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from rlbus.services.launcher.summary import format_duration
from rlbus.services.runs.progress import read_progress
from rlbus.services.runs.registry import RunRecord
from rlbus.services.runs.state import RunState

COLUMNS = ("id", "name", "model", "status", "step", "reward", "started", "duration")
MAX_CELL = 32
"""Longer names and model paths are cut from the left: their ends tell them apart."""


def list_rows(records: Sequence[RunRecord], state_of: Callable[[RunRecord], RunState], now: float) -> list[dict]:
    """Each record with its status, progress and duration (seconds)."""
    rows: list[dict[str, Any]] = []
    for record in records:
        alive, status = state_of(record)
        progress = read_progress(Path(record.output_dir))
        row = dataclasses.asdict(record)
        row.update(status=status, step=progress.step, reward=progress.reward,
                   duration_s=round(end_time(record, alive, now) - record.started, 1))  # fmt: skip
        rows.append(row)
    return rows


def end_time(record: RunRecord, alive: bool, now: float) -> float:
    """When the run ended: recorded, now while alive, else the last write to its console file."""
    if record.ended is not None:
        return record.ended
    if alive:
        return now
    try:
        return max(record.started, Path(record.console).stat().st_mtime)
    except OSError:
        return record.started


def cells(row: dict[str, Any]) -> list[str]:
    step = "-" if row["step"] is None else str(row["step"])
    if row["max_steps"] is not None:
        step += f"/{row['max_steps']}"
    return [
        row["id"], _cut(row["name"]), _cut(row["model"]), row["status"], step,
        "-" if row["reward"] is None else f"{row['reward']:.4f}",
        time.strftime("%Y-%m-%d %H:%M", time.localtime(row["started"])), format_duration(row["duration_s"]),
    ]  # fmt: skip


def print_table(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    table = [[name.upper() for name in COLUMNS], *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    out.writelines("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in table)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CELL else "…" + text[-(MAX_CELL - 1) :]
