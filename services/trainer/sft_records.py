"""metrics.jsonl and steps.jsonl of an SFT run, in the shapes the monitor writes for RL runs.

``rlbus sft`` runs without a monitor, so it writes its own figures under ``output_dir``:
one metrics line per step (``"service": "sft"``) and one steps row per step whose figures
are named ``sft/<metric>`` (``sft/loss/mean``, ``sft/optim/lr``, ``sft/progress/tokens``,
``sft/time/step``) with ``elapsed_s`` since the run started. Shapes: :mod:`rlbus.run_files`.
A resumed run appends, like the monitor does.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlbus.run_files import METRICS_FILE, STEPS_FILE, JsonlWriter, step_row

SERVICE = "sft"


class SftRecords:
    """Writes each step's metrics to both files of ``output_dir`` as the step finishes."""

    def __init__(self, output_dir: Path, replica_id: str) -> None:
        self.replica_id = replica_id
        self.metrics = JsonlWriter(Path(output_dir) / METRICS_FILE)
        self.steps = JsonlWriter(Path(output_dir) / STEPS_FILE)
        self.started = time.time()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        self.metrics.write({"step": step, "service": SERVICE, "replica_id": self.replica_id, "time": now, **metrics})
        self.steps.write(step_row(step, now, now - self.started, True, {SERVICE: metrics}))

    def close(self) -> None:
        self.metrics.close()
        self.steps.close()
