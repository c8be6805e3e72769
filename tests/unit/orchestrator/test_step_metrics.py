"""Step metrics: what happened since the previous built step is reported once, with the next one."""

from collections import Counter

from rlbus.messages import RolloutTask, SamplingParams, TaskRequest
from rlbus.services.orchestrator.buffer import GroupBuffer
from rlbus.services.orchestrator.builder import BuiltStep
from rlbus.services.orchestrator.leases import TaskLedger, WorkerPool, dispatch
from rlbus.services.orchestrator.step_metrics import StepMetrics

from .test_buffer import group


def built(step: int, errored_rollouts: float = 0.0) -> BuiltStep:
    metrics = {"reward/all/mean": 0.5, "errored_rollouts": errored_rollouts, "dropped/zero_advantage_groups": 1.0}
    return BuiltStep(step=step, batches=[], metrics=metrics, samples=[])


def test_counts_since_the_previous_step_are_reported_then_start_again():
    metrics, buffer, ledger = StepMetrics(now=10.0), GroupBuffer(max_off_policy_steps=0), TaskLedger(lease_s=1)
    metrics.drop("duplicate_results")
    metrics.drop("duplicate_results")
    metrics.drop_errored_group(num_rollouts=3)
    buffer.add(group("stale", policy_step=0), step=5)
    ledger.add(RolloutTask(task_id="t", env_id="e", example_id=0, num_rollouts=2, sampling=SamplingParams(),
                           lease_s=0, issued_at=0))  # fmt: skip
    pool = WorkerPool()
    pool.grant(b"w", TaskRequest(worker_id="w", num_tasks=1))
    dispatch(ledger, pool, now=0, wall_time=0)
    ledger.expire(now=2)
    totals = Counter(samples=8, tokens=100, problems=4)
    report = metrics.report(built(3, errored_rollouts=1.0), 15.0, buffer, ledger, totals, policy_step=2)
    assert report == {
        "reward/all/mean": 0.5, "errored_rollouts": 4.0, "dropped/zero_advantage_groups": 1.0,
        "dropped/duplicate_results": 2.0, "dropped/errored_groups": 1.0, "dropped/stale_rollouts": 2.0,
        "dropped/stale_groups": 1.0, "tasks/reissued": 1.0, "time/batch_interval": 5.0, "time/wait_for_ckpt": 0.0,
        "time/generate": 5.0, "progress/step": 3.0, "progress/total_samples": 8.0, "progress/total_tokens": 100.0,
        "progress/total_problems": 4.0, "policy/loaded_step": 2.0,
    }  # fmt: skip
    again = metrics.report(built(4), 16.0, buffer, ledger, totals, policy_step=2)
    assert "dropped/duplicate_results" not in again and again["errored_rollouts"] == 0.0
    assert (again["dropped/stale_groups"], again["tasks/reissued"], again["time/batch_interval"]) == (0.0, 0.0, 1.0)


def test_time_waiting_for_a_newer_policy_is_not_generation_time():
    metrics, buffer, ledger = StepMetrics(now=0.0), GroupBuffer(max_off_policy_steps=0), TaskLedger(lease_s=1)
    metrics.track_gate(closed=True, now=2.0)
    metrics.track_gate(closed=True, now=4.0)  # still closed: the wait started at 2
    metrics.track_gate(closed=False, now=7.0)
    report = metrics.report(built(1), 10.0, buffer, ledger, Counter(), policy_step=0)
    assert (report["time/batch_interval"], report["time/wait_for_ckpt"], report["time/generate"]) == (10.0, 5.0, 5.0)
    metrics.track_gate(closed=True, now=11.0)  # closed across the next build: counted when it opens
    report = metrics.report(built(2), 12.0, buffer, ledger, Counter(), policy_step=0)
    assert report["time/wait_for_ckpt"] == 0.0
    metrics.track_gate(closed=False, now=14.0)
    report = metrics.report(built(3), 15.0, buffer, ledger, Counter(), policy_step=1)
    assert (report["time/wait_for_ckpt"], report["time/generate"]) == (3.0, 0.0)
