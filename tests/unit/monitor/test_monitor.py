"""The monitor's domain class: messages in, files / sink / live view out (no sockets)."""

import json
import math
import sys

import pytest
from loguru import logger

from rlbus.messages import Event, Heartbeat, MetricsReport, Refused, RolloutSamples, Sample, ViewRequest
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.monitor.monitor import Monitor


class RecordingSink:
    """Stands in for W&B: records what the monitor logs."""

    def __init__(self):
        self.steps, self.tables, self.closed = [], [], None

    def log_step(self, step, metrics):
        self.steps.append((step, metrics))

    def log_samples(self, step, samples):
        if samples:
            self.tables.append((step, len(samples)))
        return bool(samples)

    def close(self, exit_code=0):
        self.closed = exit_code


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics(service, step, replica=None, **values):
    values = {name.replace("__", "/"): value for name, value in values.items()}
    return MetricsReport(service=service, replica_id=replica or f"{service}-0", step=step, sent_at=1000.0 + step,
                         metrics=values)  # fmt: skip


def make(tmp_path, **overrides):
    sink = RecordingSink()
    return Monitor(MonitorConfig(output_dir=tmp_path, **overrides), sink), sink


def test_every_report_is_a_metrics_line_and_complete_steps_reach_the_sink_and_console(tmp_path):
    monitor, sink = make(tmp_path)
    messages = []
    handler = logger.add(messages.append, level="INFO", format="{message}")
    try:
        monitor.handle(metrics("orchestrator", 0, reward__all__mean=0.25))
        monitor.handle(metrics("orchestrator", 1, reward__all__mean=0.5))
        monitor.handle(metrics("trainer", 0, loss__mean=1.5, mismatch_kl__mean=2e-6))
    finally:
        logger.remove(handler)
    rows = lines(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 0, "service": "orchestrator", "replica_id": "orchestrator-0", "time": 1000.0,
                       "reward/all/mean": 0.25}  # fmt: skip
    assert [(r["step"], r["service"]) for r in rows] == [(0, "orchestrator"), (1, "orchestrator"), (0, "trainer")]
    assert sink.steps == [(0, {"loss/mean": 1.5, "mismatch_kl/mean": 2e-6, "reward/all/mean": 0.25})]
    assert any("step 0 | reward/all/mean 0.25 | loss/mean 1.5 | mismatch_kl/mean 2.000e-06" in m for m in messages)
    monitor.close()
    # Step 1 never got its trainer report: closing still releases it, saying what is missing.
    assert sink.steps[-1] == (1, {"reward/all/mean": 0.5}) and sink.closed == 0
    assert "step 1 | reward/all/mean 0.5 | (no report from trainer)" in monitor.log_lines[-1]


def test_a_late_report_goes_to_the_file_and_the_sink_under_its_own_step(tmp_path):
    monitor, sink = make(tmp_path, step_reporters=["trainer"])
    monitor.handle(metrics("trainer", 0, loss__mean=1.0))
    monitor.handle(metrics("orchestrator", 0, reward__all__mean=0.3))
    assert sink.steps == [(0, {"loss/mean": 1.0}), (0, {"reward/all/mean": 0.3})]
    assert len(lines(tmp_path / "metrics.jsonl")) == 2


def test_samples_are_written_and_tabled_with_their_step(tmp_path):
    monitor, sink = make(tmp_path, step_reporters=["trainer"])
    samples = [Sample(env_id="reverse-text", prompt="abc", completion="cba", reward=1.0, advantage=0.5,
                      answer="cba", finish_reason="stop", num_prompt_tokens=12, num_completion_tokens=3,
                      policy_step=1)] * 2  # fmt: skip
    monitor.handle(RolloutSamples(step=2, samples=samples), now=50.0)
    assert sink.tables == []
    monitor.handle(metrics("trainer", 2, loss__mean=1.0))
    assert sink.tables == [(2, 2)]
    first = lines(tmp_path / "samples.jsonl")[0]
    assert first == {"step": 2, "time": 50.0, "env_id": "reverse-text", "prompt": "abc", "completion": "cba",
                     "answer": "cba", "reward": 1.0, "advantage": 0.5, "finish_reason": "stop",
                     "num_prompt_tokens": 12, "num_completion_tokens": 3, "policy_step": 1}  # fmt: skip


def test_events_and_a_dead_service_are_events_lines_and_view_log_lines(tmp_path):
    monitor, _ = make(tmp_path, dead_after_s=10)
    monitor.handle(Event(service="trainer", replica_id="trainer-0", sent_at=5.0, level="error", kind="failed",
                         message="CUDA out of memory", fields={"step": 3}))  # fmt: skip
    monitor.handle(Heartbeat(service="trainer", replica_id="trainer-0", host="h", pid=7, started_at=0.0,
                             sent_at=100.0, status="busy", step=3), now=100.0)  # fmt: skip
    monitor.tick(now=105.0)
    monitor.tick(now=111.0)
    events = lines(tmp_path / "events.jsonl")
    assert events[0] == {"step": 3, "time": 5.0, "service": "trainer", "replica_id": "trainer-0", "level": "error",
                         "kind": "failed", "message": "CUDA out of memory"}  # fmt: skip
    assert (events[1]["kind"], events[1]["service"], events[1]["reported_by"]) == ("service_dead", "trainer", "monitor")
    assert "trainer/trainer-0 is DEAD" in events[1]["message"] and len(events) == 2
    view = monitor.view(ViewRequest(log_offset=0), now=112.0)
    assert "ERROR   trainer/trainer-0 failed: CUDA out of memory" in view.log_lines[0]
    assert "WARNING trainer/trainer-0 is DEAD" in view.log_lines[1]
    assert view.log_offset == 2 and [h.status for h in view.health] == ["dead"] and view.sent_at == 112.0
    assert monitor.view(ViewRequest(log_offset=2)).log_lines == []
    assert monitor.view(ViewRequest(log_offset=1)).log_lines == view.log_lines[1:]
    # A tail that watched an earlier monitor is ahead of this one's count: it gets everything kept.
    assert monitor.view(ViewRequest(log_offset=99)).log_lines == view.log_lines


def test_view_log_lines_keep_only_the_newest(tmp_path):
    monitor, _ = make(tmp_path, view_log_lines=3)
    for i in range(5):
        monitor.handle(Event(service="s", replica_id="r", sent_at=0.0, kind="k", message=f"m{i}"))
    view = monitor.view(ViewRequest(log_offset=0))
    assert [line.rsplit(" ", 1)[-1] for line in view.log_lines] == ["m2", "m3", "m4"] and view.log_offset == 5


def test_view_shows_the_latest_released_step(tmp_path):
    monitor, _ = make(tmp_path, step_reporters=["trainer"])
    assert monitor.view(ViewRequest()).step is None
    monitor.handle(metrics("trainer", 4, loss__mean=0.5))
    monitor.handle(metrics("orchestrator", 5, reward__all__mean=0.9))
    view = monitor.view(ViewRequest())
    assert (view.step, view.metrics) == (4, {"loss/mean": 0.5})


def test_view_key_is_required_when_configured(tmp_path):
    monitor, _ = make(tmp_path, view_api_key="s3cret")
    refused = monitor.view(ViewRequest())
    assert isinstance(refused, Refused) and "wrong or missing api key" in refused.reason
    assert isinstance(monitor.view(ViewRequest(api_key="nope")), Refused)
    assert monitor.view(ViewRequest(api_key="s3cret")).log_offset == 0
    assert monitor.counts["view_refused"] == 2


def test_non_finite_and_reserved_metric_names_are_counted_and_written_safely(tmp_path):
    monitor, _ = make(tmp_path)
    messages = []
    handler = logger.add(messages.append, level="WARNING", format="{message}")
    try:
        monitor.handle(MetricsReport(service="trainer", replica_id="trainer-0", step=0, sent_at=1000.0,
                                     metrics={"loss/mean": math.nan, "step": 99.0}))
        monitor.handle(metrics("trainer", 1, loss__mean=math.inf))
    finally:
        logger.remove(handler)
    rows = lines(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 0, "service": "trainer", "replica_id": "trainer-0", "time": 1000.0, "loss/mean": None}
    assert monitor.counts["bad_metrics"] == 3
    assert sum("'loss/mean'" in m and "is not finite" in m for m in messages) == 1
    assert any("'step'" in m and "clashes with a fixed key" in m for m in messages)


def test_wandb_enabled_without_the_package_names_the_extra(tmp_path, monkeypatch):
    from rlbus.services.monitor.config import WandbConfig
    from rlbus.services.monitor.wandb_sink import WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes "import wandb" fail
    with pytest.raises(ValueError, match=r"pip install 'rlbus\[monitor\]'"):
        WandbSink(MonitorConfig(output_dir=tmp_path, wandb=WandbConfig(enabled=True)))
