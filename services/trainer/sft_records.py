"""metrics.jsonl and steps.jsonl of an SFT run, in the shapes the monitor writes for RL runs.

``rlbus sft`` runs without a monitor, so it writes its own figures under ``output_dir``:
one metrics line per step (``"service": "sft"``) and one steps row per step whose figures
are named ``sft/<metric>`` (``sft/loss/mean``, ``sft/optim/lr``, ``sft/progress/tokens``,
``sft/time/step``) with ``elapsed_s`` since the run started. Shapes: :mod:`rlbus.run_files`.
A resumed run appends, like the monitor does. When the run ends its charts are drawn into
``<output_dir>/charts/``, as the monitor does for RL runs (:mod:`rlbus.plots`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rlbus.plots import draw_run_charts
from rlbus.run_files import METRICS_FILE, STEPS_FILE, JsonlWriter, step_row

SERVICE = "sft"


class SftRecords:
    """Writes each step's metrics to both files of ``output_dir`` as the step finishes."""

    def __init__(self, output_dir: Path, replica_id: str) -> None:
        self.output_dir = Path(output_dir)
        self.replica_id = replica_id
        self.metrics = JsonlWriter(self.output_dir / METRICS_FILE)
        self.steps = JsonlWriter(self.output_dir / STEPS_FILE)
        self.started = time.time()

    def write(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Write both lines of ``step``; returns its steps.jsonl row."""
        now = time.time()
        self.metrics.write({"step": step, "service": SERVICE, "replica_id": self.replica_id, "time": now, **metrics})
        row = step_row(step, now, now - self.started, True, {SERVICE: metrics})
        self.steps.write(row)
        return row

    def close(self) -> None:
        self.metrics.close()
        self.steps.close()
        draw_run_charts(self.output_dir)
