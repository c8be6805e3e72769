"""What the monitor does with each telemetry message, without sockets.

:class:`Monitor` takes decoded messages and the time, and writes the JSONL
files, the console summary, W&B rows, the health table and the log lines of
the live view. :mod:`rlbus.services.monitor.service` owns the sockets and feeds it.

Log lines of the live view are the events services send (started, failed,
warnings ...) and the monitor's own notices (step summaries, dead services),
not the services' log files: events travel over the bus, so ``rlbus tail``
shows them from any host. Full logs stay in each host's ``<output_dir>/logs/``.
"""

from __future__ import annotations

import hmac
import time
from collections import Counter, deque
from typing import Protocol

from loguru import logger

from rlbus.messages import (
    Event,
    Heartbeat,
    Message,
    MetricsReport,
    Refused,
    RolloutSamples,
    Sample,
    ViewRequest,
    ViewSnapshot,
)  # fmt: skip
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.monitor.health import HealthNotice, HealthTable
from rlbus.services.monitor.records import (
    RunFiles,
    event_line,
    metrics_line,
    non_finite_names,
    reserved_names,
    sample_lines,
)  # fmt: skip
from rlbus.services.monitor.steps import StepAggregator, StepRow, format_summary
from rlbus.services.monitor.steps_file import StepsFile

MAX_VIEW_LINES = 500
"""Log lines in one ViewSnapshot; a tail further behind skips the older ones."""


class MetricsSink(Protocol):
    """Where released step rows go besides the console (W&B)."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_samples(self, step: int, samples: list[Sample]) -> bool: ...
    def close(self, exit_code: int = 0) -> None: ...


class SinkFanOut:
    """Several sinks as one: W&B and the Prime platform get the same rows and samples."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_step(step, metrics)

    def log_samples(self, step: int, samples: list[Sample]) -> bool:
        logged = [sink.log_samples(step, samples) for sink in self.sinks]  # every sink gets them, not the first
        return any(logged)

    def close(self, exit_code: int = 0) -> None:
        for sink in self.sinks:
            sink.close(exit_code)


class Monitor:
    """Telemetry in; files, console, W&B, the Prime platform, health and the live view out."""

    def __init__(self, config: MonitorConfig, sink: MetricsSink | None = None) -> None:
        self.config = config
        self.sink = sink
        self.files = RunFiles(config.output_dir)
        self.health = HealthTable(config.dead_after_s, config.stalled_after_s, config.progress_stalled_after_s,
                                  frozenset(config.step_reporters))
        self.steps = StepAggregator(config.step_reporters, config.max_summary_lag_steps)
        self.steps_file = StepsFile(config.step_reporters)
        self.log_lines: deque[str] = deque(maxlen=config.view_log_lines)
        self.num_log_lines = 0
        self.counts: Counter[str] = Counter()
        """Messages handled by type, plus ``bad_metrics`` (non-finite or reserved names)."""
        self.finished: set[str] = set()
        """Services that reported a ``finished`` event (the orchestrator and trainer after their last step)."""
        self._warned: set[tuple[str, str]] = set()

    def handle(self, message: Message, now: float | None = None) -> None:
        """Take one telemetry message."""
        now = time.time() if now is None else now
        self.counts[type(message).__name__] += 1
        if isinstance(message, Heartbeat):
            for notice in self.health.observe(message, now):
                self._notice(notice, now)
        elif isinstance(message, MetricsReport):
            self._on_metrics(message, now)
        elif isinstance(message, Event):
            self._on_event(message)
        elif isinstance(message, RolloutSamples):
            self._on_samples(message, now)
        else:
            raise TypeError(f"the monitor does not take {type(message).__name__} messages on telemetry")

    def tick(self, now: float | None = None) -> None:
        """Periodic work: turn silence into dead services and long waits into warnings."""
        now = time.time() if now is None else now
        for notice in self.health.check(now):
            self._notice(notice, now)

    def view(self, request: ViewRequest, now: float | None = None) -> ViewSnapshot | Refused:
        """The live view for ``rlbus tail``, or a refusal when its key is wrong."""
        key = self.config.view_api_key
        if key is not None and not hmac.compare_digest((request.api_key or "").encode(), key.encode()):
            self.counts["view_refused"] += 1
            return Refused(request="ViewRequest", reason="wrong or missing api key (monitor.view_api_key)")
        latest = self.steps.latest
        return ViewSnapshot(
            step=latest.step if latest else None, metrics=self.steps.metrics(latest) if latest else {},
            health=self.health.rows(), log_lines=self._lines_after(request.log_offset),
            log_offset=self.num_log_lines, sent_at=time.time() if now is None else now,
        )  # fmt: skip

    def close(self, exit_code: int = 0) -> None:
        """Release the steps still waiting for reports, close files and the W&B run."""
        for row in self.steps.flush():
            self._release(row)
        for line in self.steps_file.flush(time.time()):
            self.files.steps.write(line)
        self.files.close()
        if self.sink is not None:
            self.sink.close(exit_code)

    def _on_metrics(self, report: MetricsReport, now: float) -> None:
        self._check_metrics(report)
        self.files.metrics.write(metrics_line(report))
        for line in self.steps_file.add(report, now):
            self.files.steps.write(line)
        if self.steps.is_released(report.step):
            # Late for the summary; W&B still files it under its step.
            if self.sink is not None:
                late = StepRow(report.step, {(report.service, report.replica_id): dict(report.metrics)})
                self.sink.log_step(report.step, self.steps.metrics(late))
            return
        for row in self.steps.add_metrics(report):
            self._release(row)

    def _on_samples(self, message: RolloutSamples, now: float) -> None:
        for line in sample_lines(message, now):
            self.files.samples.write(line)
        if self.steps.is_released(message.step):
            if self.sink is not None:
                self.sink.log_samples(message.step, message.samples)
        else:
            self.steps.add_samples(message.step, message.samples)

    def _on_event(self, event: Event) -> None:
        if event.kind == "finished":
            self.finished.add(event.service)
        self.files.events.write(event_line(event))
        self._line(event.level, f"{event.service}/{event.replica_id} {event.kind}: {event.message}", event.sent_at)

    def _release(self, row: StepRow) -> None:
        merged = self.steps.metrics(row)
        if row.reports:
            summary = format_summary(row, merged, self.config.summary_metrics, self.config.step_reporters)
            # A step that only periodic reporters (env-workers, inference) mentioned is noise on the console.
            shown = self.config.console and bool(row.services & set(self.config.step_reporters))
            self._line("info" if shown else "debug", summary)
        if self.sink is not None:
            self.sink.log_step(row.step, merged)
            self.sink.log_samples(row.step, row.samples)

    def _notice(self, notice: HealthNotice, now: float) -> None:
        self.files.events.write({
            **notice.fields, "time": now, "service": notice.service, "replica_id": notice.replica_id,
            "level": notice.level, "kind": notice.kind, "message": notice.message, "reported_by": "monitor",
        })  # fmt: skip
        self._line(notice.level, notice.message, now)

    def _check_metrics(self, report: MetricsReport) -> None:
        """Warn once per (service, metric) about values that will not show as numbers."""
        problems = [(n, "is not finite (written as null)") for n in non_finite_names(report)]
        problems += [(n, "clashes with a fixed key of metrics.jsonl (dropped)") for n in reserved_names(report)]
        for name, problem in problems:
            self.counts["bad_metrics"] += 1
            if (report.service, name) not in self._warned:
                self._warned.add((report.service, name))
                logger.warning("{} metric {!r} at step {} {}", report.service, name, report.step, problem)

    def _line(self, level: str, text: str, at: float | None = None) -> None:
        """Log ``text`` and keep it for the live view."""
        logger.log(level.upper(), text)
        stamp = time.strftime("%H:%M:%S", time.localtime(time.time() if at is None else at))
        self.log_lines.append(f"{stamp} {level.upper():<7} {text}")
        self.num_log_lines += 1

    def _lines_after(self, offset: int) -> list[str]:
        oldest = self.num_log_lines - len(self.log_lines)
        # An offset past the end comes from a tail that watched a previous monitor: send everything.
        start = oldest if offset > self.num_log_lines else max(offset, oldest)
        lines = list(self.log_lines)[start - oldest:]
        return lines[-MAX_VIEW_LINES:]
