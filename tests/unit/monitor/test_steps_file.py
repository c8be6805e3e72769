"""steps.jsonl: one row per step with every service's figures, written in step order once the
step reporters are in, the rest at shutdown; metrics.jsonl keeps one line per report."""

import json

from rlbus.messages import MetricsReport
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.monitor.monitor import Monitor
from rlbus.services.monitor.steps_file import StepsFile, per_service


def report(service, step, replica=None, **values):
    values = {name.replace("__", "/"): value for name, value in values.items()}
    return MetricsReport(service=service, replica_id=replica or f"{service}-0", step=step, sent_at=0.0,
                         metrics=values)  # fmt: skip


def test_a_row_is_written_once_trainer_and_orchestrator_reported_its_step():
    steps = StepsFile(["orchestrator", "trainer"])
    assert steps.add(report("inference", 0, num_requests=3.0), now=10.0) == []
    assert steps.add(report("orchestrator", 1, reward__all__mean=0.25), now=11.0) == []
    # With async training the orchestrator is a step ahead: step 2 waits for its trainer report.
    assert steps.add(report("orchestrator", 2, reward__all__mean=0.5), now=12.0) == []
    [row] = steps.add(report("trainer", 1, loss__mean=1.5), now=13.0)
    assert row == {"step": 1, "time": 13.0, "elapsed_s": 3.0, "complete": True, "inference/num_requests": 3.0,
                   "orchestrator/reward/all/mean": 0.25, "trainer/loss/mean": 1.5}  # fmt: skip
    assert [r["step"] for r in steps.flush(now=20.0)] == [2]


def test_periodic_services_give_their_latest_figures_averaged_over_replicas():
    steps = StepsFile(["trainer"])
    steps.add(report("env-worker", 0, "w1", tasks__done=1.0, busy=1.0), now=0.0)
    steps.add(report("env-worker", 0, "w2", tasks__done=3.0), now=0.0)
    steps.add(report("env-worker", 4, "w1", tasks__done=5.0), now=0.0)  # replaces w1's tasks/done only
    steps.add(report("inference", 3, inference__requests_running=2.0, bus__rejected_messages=1.0), now=0.0)
    [row] = steps.add(report("trainer", 1, loss__mean=1.0), now=1.0)
    assert (row["env-worker/tasks/done"], row["env-worker/busy"]) == (4.0, 1.0)
    # A name that already says its service is not prefixed twice.
    assert (row["inference/requests_running"], row["inference/bus/rejected_messages"]) == (2.0, 1.0)


def test_rows_come_in_step_order_once_a_later_step_completes_and_late_reports_are_left_out():
    steps = StepsFile(["orchestrator", "trainer"])
    steps.add(report("orchestrator", 0, eval__avg=0.1), now=0.0)  # an evaluation of the base policy
    steps.add(report("orchestrator", 1, reward__all__mean=0.2), now=0.0)
    rows = steps.add(report("trainer", 1, loss__mean=2.0), now=1.0)
    assert [(r["step"], r["complete"]) for r in rows] == [(0, False), (1, True)]
    assert steps.add(report("orchestrator", 1, eval__avg=0.3), now=2.0) == []  # late: metrics.jsonl only
    assert steps.flush(now=3.0) == []


def test_a_repeated_report_of_one_replica_updates_its_figures():
    assert per_service({("trainer", "t0"): {"loss/mean": 1.0}, ("trainer", "t1"): {"loss/mean": 3.0}}) == {
        "trainer": {"loss/mean": 2.0}
    }
    steps = StepsFile(["trainer"])
    steps.pending[1] = {("trainer", "t0"): {"loss/mean": 1.0}}
    steps.add(report("orchestrator", 1, x=1.0), now=0.0)
    [row] = steps.flush(now=1.0)
    assert row["complete"] is True and row["trainer/loss/mean"] == 1.0 and "orchestrator/x" in row


def test_the_monitor_writes_one_steps_row_per_step_and_keeps_every_report_in_metrics(tmp_path):
    monitor = Monitor(MonitorConfig(output_dir=tmp_path))
    for step in (1, 2, 3):
        monitor.handle(report("inference", step, num_requests=float(step)), now=float(step))
        monitor.handle(report("env-worker", step, tasks__done=float(step)), now=float(step))
        monitor.handle(report("orchestrator", step, reward__all__mean=step / 10), now=float(step))
        if step < 3:
            monitor.handle(report("trainer", step, loss__mean=1.0 / step), now=float(step))
    monitor.close()
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [(r["step"], r["complete"]) for r in rows] == [(1, True), (2, True), (3, False)]
    assert rows[1]["orchestrator/reward/all/mean"] == 0.2 and rows[1]["trainer/loss/mean"] == 0.5
    assert rows[1]["inference/num_requests"] == 2.0 and rows[1]["env-worker/tasks/done"] == 2.0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 11
