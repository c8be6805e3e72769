"""The monitor's files: metrics.jsonl, steps.jsonl, samples.jsonl and events.jsonl under ``output_dir``.

One JSON object per line, appended and flushed as each message arrives, so a
crash loses nothing already received and ``tail -f`` works. Non-finite
numbers (a NaN loss) are written as ``null``: strict JSON readers (jq, JS)
reject ``NaN``.

- ``metrics.jsonl``: ``{"step", "service", "replica_id", "time", <metric>: value, ...}``,
  one line per report (one per service replica and step; a restarted service
  may repeat a step: readers keep the last line of each (step, service, replica_id)).
- ``steps.jsonl``: one line per step, every service's figures of it side by side
  (:mod:`rlbus.services.monitor.steps_file`, row shape in :mod:`rlbus.run_files`).
- ``samples.jsonl``: ``{"step", "time", "env_id", "prompt", "completion", "answer", "reward", "advantage",
  "finish_reason", "num_prompt_tokens", "num_completion_tokens", "policy_step"}``.
- ``events.jsonl``: ``{"time", "service", "replica_id", "level", "kind", "message", <field>: value, ...}``;
  the monitor's own findings (a dead service, ...) carry ``"reported_by": "monitor"``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rlbus.messages import Event, MetricsReport, RolloutSamples
from rlbus.run_files import EVENTS_FILE, METRICS_FILE, SAMPLES_FILE, STEPS_FILE, JsonlWriter

__all__ = ["EVENTS_FILE", "METRICS_FILE", "SAMPLES_FILE", "STEPS_FILE", "JsonlWriter", "RunFiles"]

_RESERVED_METRIC_KEYS = frozenset({"step", "service", "replica_id", "time"})


def metrics_line(report: MetricsReport) -> dict[str, Any]:
    # Fixed keys last: a metric cannot overwrite them (names like "step" are refused upstream anyway).
    metrics = {name: value for name, value in report.metrics.items() if name not in _RESERVED_METRIC_KEYS}
    return {"step": report.step, "service": report.service, "replica_id": report.replica_id,
            "time": report.sent_at, **metrics}  # fmt: skip


def reserved_names(report: MetricsReport) -> list[str]:
    """Metric names that clash with the fixed keys of a metrics line (and are dropped)."""
    return sorted(_RESERVED_METRIC_KEYS & set(report.metrics))


def non_finite_names(report: MetricsReport) -> list[str]:
    return sorted(name for name, value in report.metrics.items() if not math.isfinite(value))


def sample_lines(message: RolloutSamples, now: float) -> list[dict[str, Any]]:
    return [
        {"step": message.step, "time": now, "env_id": s.env_id, "prompt": s.prompt, "completion": s.completion,
         "answer": s.answer, "reward": s.reward, "advantage": s.advantage, "finish_reason": s.finish_reason,
         "num_prompt_tokens": s.num_prompt_tokens, "num_completion_tokens": s.num_completion_tokens,
         "policy_step": s.policy_step}
        for s in message.samples
    ]  # fmt: skip


def event_line(event: Event) -> dict[str, Any]:
    return {**event.fields, "time": event.sent_at, "service": event.service, "replica_id": event.replica_id,
            "level": event.level, "kind": event.kind, "message": event.message}  # fmt: skip


class RunFiles:
    """The four JSONL files of one run folder."""

    def __init__(self, output_dir: Path) -> None:
        self.metrics = JsonlWriter(output_dir / METRICS_FILE)
        self.steps = JsonlWriter(output_dir / STEPS_FILE)
        self.samples = JsonlWriter(output_dir / SAMPLES_FILE)
        self.events = JsonlWriter(output_dir / EVENTS_FILE)

    def close(self) -> None:
        for writer in (self.metrics, self.steps, self.samples, self.events):
            writer.close()

