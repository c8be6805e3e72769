"""Per-step aggregation of the metrics every service reports.

Services report the same step at different times: with ``max_async_level``
1 the orchestrator reports step N+1 before the trainer reports step N. The
aggregator keeps one row per step and releases rows in step order once
each of ``step_reporters`` has reported (or, if one never does, once any
service is ``max_lag_steps`` further), so the console summary and W&B get
one complete row per step. A complete row also releases every earlier one:
each sender's reports arrive in order, so nothing more is coming for them.
metrics.jsonl does not wait: it gets every report as it arrives.

Services that report periodically (inference, env-workers) may report one
step several times: a replica's later values replace its earlier ones. A
name reported by two services (say both sent ``time/step``) is ambiguous: from
the first time that happens on, it is shown as ``<service>/<name>``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from rlbus.messages import MetricsReport, Sample


@dataclass
class StepRow:
    """Everything reported for one step."""

    step: int
    reports: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    """(service, replica_id) -> metrics; a second report of the same replica updates the first."""
    samples: list[Sample] = field(default_factory=list)

    @property
    def services(self) -> set[str]:
        return {service for service, _ in self.reports}

    def merged(self, per_service: Collection[str] = ()) -> dict[str, float]:
        """One value per metric name: the mean over the replicas that reported it; names in
        ``per_service`` are kept apart per service as ``<service>/<name>``."""
        values: dict[str, list[float]] = defaultdict(list)
        for (service, _), metrics in self.reports.items():
            for name, value in metrics.items():
                values[f"{service}/{name}" if name in per_service else name].append(value)
        return {name: math.fsum(vs) / len(vs) for name, vs in sorted(values.items())}

    def shared_names(self) -> set[str]:
        """Names reported by more than one service in this row."""
        services_of: dict[str, set[str]] = defaultdict(set)
        for (service, _), metrics in self.reports.items():
            for name in metrics:
                services_of[name].add(service)
        return {name for name, services in services_of.items() if len(services) > 1}


class StepAggregator:
    """Collects reports into :class:`StepRow` s and releases them complete and in step order."""

    def __init__(self, step_reporters: Iterable[str], max_lag_steps: int) -> None:
        self.step_reporters = set(step_reporters)
        self.max_lag_steps = max_lag_steps
        self.pending: dict[int, StepRow] = {}
        self.last_released: int | None = None
        self.latest: StepRow | None = None
        """The most recently released row (what ``rlbus tail`` shows)."""
        self.highest_step: int | None = None
        self.per_service_names: set[str] = set()
        """Names ever reported by two services in one step: shown per service from then on."""

    def metrics(self, row: StepRow) -> dict[str, float]:
        """The row's merged metrics, ambiguous names split per service."""
        return row.merged(self.per_service_names)

    def is_released(self, step: int) -> bool:
        """True when ``step``'s row was already released: later reports of it arrive late."""
        return self.last_released is not None and step <= self.last_released

    def add_metrics(self, report: MetricsReport) -> list[StepRow]:
        """Add a report of a step not yet released; returns the rows it completes."""
        if self.is_released(report.step):
            raise ValueError(f"step {report.step} was already released (last released {self.last_released})")
        row = self.pending.setdefault(report.step, StepRow(report.step))
        row.reports.setdefault((report.service, report.replica_id), {}).update(report.metrics)
        self.per_service_names |= row.shared_names()
        self.highest_step = max(report.step, self.highest_step if self.highest_step is not None else report.step)
        return self._release_ready()

    def add_samples(self, step: int, samples: list[Sample]) -> None:
        """Attach samples to a step not yet released."""
        if self.is_released(step):
            raise ValueError(f"step {step} was already released (last released {self.last_released})")
        self.pending.setdefault(step, StepRow(step)).samples.extend(samples)

    def flush(self) -> list[StepRow]:
        """Release every pending row (at shutdown), complete or not."""
        return [self._release(step) for step in sorted(self.pending)]

    def _is_complete(self, row: StepRow) -> bool:
        if self.step_reporters <= row.services:
            return True
        return self.highest_step is not None and self.highest_step >= row.step + self.max_lag_steps

    def _release_ready(self) -> list[StepRow]:
        complete = [step for step, row in self.pending.items() if self._is_complete(row)]
        if not complete:
            return []
        last = max(complete)
        return [self._release(step) for step in sorted(self.pending) if step <= last]

    def _release(self, step: int) -> StepRow:
        row = self.pending.pop(step)
        self.last_released = step
        if row.reports:  # a row of samples alone has nothing to show
            self.latest = row
        return row


def format_value(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    return f"{value:.3e}" if magnitude < 1e-3 or magnitude >= 1e6 else f"{value:.4g}"


def format_summary(row: StepRow, merged: dict[str, float], keys: list[str], step_reporters: Iterable[str],
                   max_shown: int = 6) -> str:  # fmt: skip
    """The console line of one step: its key metrics (also when split per service), and which
    expected reports are missing."""
    split = {key: [f"{service}/{key}" for service in sorted(row.services)] for key in keys}
    shown = [name for key in keys for name in [key, *split[key]] if name in merged] or sorted(merged)[:max_shown]
    parts = [f"step {row.step}"] + [f"{key} {format_value(merged[key])}" for key in shown]
    missing = sorted(set(step_reporters) - row.services)
    if missing:
        parts.append(f"(no report from {', '.join(missing)})")
    return " | ".join(parts)
