"""Per-step aggregation: rows released complete, in order, merged over replicas."""

import math

import pytest

from rlbus.messages import MetricsReport, Sample
from rlbus.services.monitor.steps import StepAggregator, StepRow, format_summary, format_value


def report(service: str, step: int, replica: str | None = None, **metrics: float) -> MetricsReport:
    metrics = {name.replace("__", "/"): value for name, value in metrics.items()}
    return MetricsReport(service=service, replica_id=replica or service, step=step, sent_at=0.0, metrics=metrics)


def test_a_step_is_released_when_every_reporter_has_reported_it_even_out_of_order():
    steps = StepAggregator(["orchestrator", "trainer"], max_lag_steps=3)
    assert steps.add_metrics(report("orchestrator", 0, reward__all__mean=0.1)) == []
    # One step ahead: the orchestrator reports step 1 before the trainer trained step 0.
    assert steps.add_metrics(report("orchestrator", 1, reward__all__mean=0.2)) == []
    (row,) = steps.add_metrics(report("trainer", 0, loss__mean=2.0))
    assert row.step == 0 and row.merged() == {"loss/mean": 2.0, "reward/all/mean": 0.1}
    assert steps.latest is row and steps.is_released(0) and not steps.is_released(1)
    (row,) = steps.add_metrics(report("trainer", 1, loss__mean=1.5))
    assert row.step == 1


def test_a_missing_reporter_holds_a_step_only_until_others_are_max_lag_steps_further():
    steps = StepAggregator(["orchestrator", "trainer"], max_lag_steps=2)
    steps.add_metrics(report("orchestrator", 0, x=1.0))
    assert steps.add_metrics(report("orchestrator", 1, x=1.0)) == []
    released = steps.add_metrics(report("orchestrator", 2, x=1.0))
    assert [row.step for row in released] == [0]
    assert [row.step for row in steps.flush()] == [1, 2]


def test_replicas_of_a_service_are_averaged_and_a_repeated_report_updates():
    steps = StepAggregator(["trainer"], max_lag_steps=2)
    steps.add_metrics(report("env-worker", 4, replica="w0", x=1.0, y=5.0))
    steps.add_metrics(report("env-worker", 4, replica="w1", x=3.0))
    row = steps.pending[4]
    assert row.merged() == {"x": 2.0, "y": 5.0}
    steps.add_metrics(report("env-worker", 4, replica="w1", x=5.0))
    assert row.merged()["x"] == 3.0


def test_late_reports_and_samples_of_released_steps_are_refused():
    steps = StepAggregator(["trainer"], max_lag_steps=2)
    steps.add_samples(3, [Sample(env_id="e", prompt="p", completion="c", reward=1.0)])
    (row,) = steps.add_metrics(report("trainer", 3, x=1.0))
    assert len(row.samples) == 1
    with pytest.raises(ValueError, match="step 3 was already released"):
        steps.add_metrics(report("trainer", 3, x=1.0))
    with pytest.raises(ValueError, match="step 2 was already released"):
        steps.add_samples(2, [])


def test_summary_shows_key_metrics_in_order_and_names_missing_reporters():
    row = StepRow(7, reports={("trainer", "t"): {"loss/mean": 0.5, "mismatch_kl/mean": 1.2e-6, "other": 3.0}})
    keys = ["reward/all/mean", "loss/mean", "mismatch_kl/mean"]
    text = format_summary(row, row.merged(), keys, ["orchestrator", "trainer"])
    assert text == "step 7 | loss/mean 0.5 | mismatch_kl/mean 1.200e-06 | (no report from orchestrator)"
    fallback_row = StepRow(1, reports={("a", "a"): {"b": 1.0, "a": 2.0}})
    assert format_summary(fallback_row, fallback_row.merged(), ["zzz"], ["a"]) == "step 1 | a 2 | b 1"


def test_a_name_two_services_report_is_kept_apart_per_service_from_then_on():
    steps = StepAggregator(["orchestrator", "trainer"], max_lag_steps=5)
    steps.add_metrics(report("orchestrator", 0, time__step=30.0, reward__all__mean=0.5))
    (row,) = steps.add_metrics(report("trainer", 0, time__step=10.0))
    assert steps.metrics(row) == {"orchestrator/time/step": 30.0, "reward/all/mean": 0.5, "trainer/time/step": 10.0}
    steps.add_metrics(report("orchestrator", 1, time__step=20.0))
    (row,) = steps.add_metrics(report("trainer", 1, loss__mean=1.0))
    assert steps.metrics(row) == {"loss/mean": 1.0, "orchestrator/time/step": 20.0}
    summary = format_summary(row, steps.metrics(row), ["loss/mean", "time/step"], ["trainer"])
    assert summary == "step 1 | loss/mean 1 | orchestrator/time/step 20"


def test_a_complete_step_releases_earlier_steps_that_only_periodic_reporters_reported():
    steps = StepAggregator(["orchestrator", "trainer"], max_lag_steps=10)
    steps.add_metrics(report("env-worker", 0, tasks=1.0))
    steps.add_metrics(report("env-worker", 0, tasks=3.0))  # a periodic report of the same step
    steps.add_metrics(report("orchestrator", 1, x=1.0))
    released = steps.add_metrics(report("trainer", 1, y=1.0))
    assert [row.step for row in released] == [0, 1] and released[0].merged() == {"tasks": 3.0}


def test_format_value_keeps_non_finite_and_tiny_values_readable():
    assert format_value(math.nan) == "nan" and format_value(0.0) == "0.0"
    assert format_value(123456.0) == "1.235e+05" and format_value(-1.5) == "-1.5"
    assert format_value(0.41234) == "0.4123" and format_value(2e-5) == "2.000e-05" and format_value(3e7) == "3.000e+07"
