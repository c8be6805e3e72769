"""Rows of ``steps.jsonl``: one per step, every service's figures of that step side by side.

metrics.jsonl has one line per report: a 30-step run gives some 260 lines to join
(each inference replica and env-worker reports on its own clock). A steps.jsonl row
holds, for one step:

- the step reporters' figures (orchestrator: the built step's rewards, lengths, drops;
  trainer: loss, entropy, timings), each reported for that step;
- the latest figures of every other service (inference, env-workers, the monitor's own
  bus counts) at the moment the row is written, whatever step they reported them at.

A row is written once every step reporter reported its step, and then every earlier
row still waiting goes too (each sender's reports arrive in order, so nothing more is
coming for them): rows are written in step order. At shutdown the rows still waiting
are written with ``complete: false``. A report for a step already written (an
evaluation of an earlier policy finishing late) is in metrics.jsonl only: steps.jsonl
keeps one row per step. Replicas of one service are averaged per name.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from rlbus.messages import MetricsReport
from rlbus.run_files import step_row

Figures = dict[tuple[str, str], dict[str, float]]
"""(service, replica_id) -> metrics."""


class StepsFile:
    """Turns metrics reports into complete ``steps.jsonl`` rows, in step order."""

    def __init__(self, step_reporters: Iterable[str]) -> None:
        self.step_reporters = frozenset(step_reporters)
        self.pending: dict[int, Figures] = {}
        """Step -> the step reporters' figures reported for it so far."""
        self.latest: Figures = {}
        """The latest figures of each replica of the other services."""
        self.last_written: int | None = None
        self.first_report_at: float | None = None

    def add(self, report: MetricsReport, now: float) -> list[dict[str, Any]]:
        """Take one report; returns the rows it completes (possibly none)."""
        if self.first_report_at is None:
            self.first_report_at = now
        key = (report.service, report.replica_id)
        if report.service not in self.step_reporters:
            self.latest.setdefault(key, {}).update(report.metrics)
            return []
        if self.last_written is not None and report.step <= self.last_written:
            return []  # late: in metrics.jsonl only
        figures = self.pending.setdefault(report.step, {})
        figures.setdefault(key, {}).update(report.metrics)
        if not self._is_complete(figures):
            return []
        return [self._row(step, now) for step in sorted(self.pending) if step <= report.step]

    def flush(self, now: float) -> list[dict[str, Any]]:
        """Every row still waiting (at shutdown), complete or not."""
        return [self._row(step, now) for step in sorted(self.pending)]

    def _is_complete(self, figures: Figures) -> bool:
        return self.step_reporters <= {service for service, _ in figures}

    def _row(self, step: int, now: float) -> dict[str, Any]:
        figures = self.pending.pop(step)
        self.last_written = step
        by_service = per_service({**self.latest, **figures})
        elapsed_s = now - self.first_report_at if self.first_report_at is not None else 0.0
        return step_row(step, now, elapsed_s, self._is_complete(figures), by_service)


def per_service(figures: Mapping[tuple[str, str], Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{service: {name: mean over the service's replicas that reported name}}``."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (service, _), metrics in figures.items():
        for name, value in metrics.items():
            values[service][name].append(value)
    return {service: {name: math.fsum(vs) / len(vs) for name, vs in names.items()}
            for service, names in values.items()}  # fmt: skip
