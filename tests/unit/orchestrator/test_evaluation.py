"""avg@k and pass@k on hand cases, and eval rounds from tasks to metrics."""

import pytest

from rlbus.messages import Rollout, RolloutResult
from rlbus.services.orchestrator.config import EvalConfig, EvalEnvSpec
from rlbus.services.orchestrator.evaluation import EvalScheduler, env_metrics, pass_at_k


def test_pass_at_k_hand_cases():
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="n=2 c=3 k=1"):
        pass_at_k(2, 3, 1)


def test_env_metrics_hand_case():
    rewards = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.5]]
    metrics = env_metrics("math", rewards, k=3, threshold=1.0)
    assert metrics["eval/math/avg@3"] == pytest.approx(3.5 / 9)
    assert metrics["eval/math/pass@3"] == pytest.approx(2 / 3)
    assert metrics["eval/math/num_examples"] == 3.0
    # A lower threshold counts the 0.5 as solved too: no change for pass@3 here, but the middle stays 0.
    assert env_metrics("math", rewards, k=3, threshold=0.5)["eval/math/pass@3"] == pytest.approx(2 / 3)


def result(task_id: str, rewards: list[float], errors: int = 0) -> RolloutResult:
    rollouts = [Rollout(rollout_id=f"{task_id}/{i}", turns=[], reward=r, error="boom" if i < errors else None)
                for i, r in enumerate(rewards)]
    return RolloutResult(task_id=task_id, worker_id="w", env_id="e", example_id=0, is_eval=True, rollouts=rollouts)


def test_round_reports_per_env_once_every_task_is_in():
    config = EvalConfig(interval=2, env=[EvalEnvSpec(id="a", num_examples=2, rollouts_per_example=2),
                                         EvalEnvSpec(id="b", num_examples=5, rollouts_per_example=1)])
    ids = iter(f"t{i}" for i in range(100))
    scheduler = EvalScheduler(config, env_sizes=[10, 1])
    assert scheduler.due(0) and not scheduler.due(1) and scheduler.due(4)
    planned = scheduler.start(4, lambda: next(ids))
    assert [(t, s.id, e) for t, s, e in planned] == [("t0", "a", 0), ("t1", "a", 1), ("t2", "b", 0)]
    assert not scheduler.due(4)
    assert scheduler.record(result("t0", [1.0, 0.0])) is None
    assert scheduler.record(result("unrelated", [1.0])) is None
    assert scheduler.record(result("t2", [float("nan")])) is None
    finished = scheduler.record(result("t1", [0.0, 0.0], errors=1))
    assert finished is not None and finished.policy_step == 4
    metrics = finished.metrics()
    assert metrics["eval/a/avg@2"] == pytest.approx(0.25) and metrics["eval/a/pass@2"] == pytest.approx(0.5)
    assert metrics["eval/b/avg@1"] == 0.0 and metrics["eval/b/pass@1"] == 0.0
    assert metrics["eval/a/errored_rollouts"] == 1.0
    assert not scheduler.rounds


def test_disabled_eval_is_never_due():
    assert not EvalScheduler(EvalConfig(), env_sizes=[]).due(0)
    assert not EvalScheduler(EvalConfig(interval=1), env_sizes=[]).due(0)
    assert not EvalScheduler(EvalConfig(), env_sizes=[], final_step=3).final_pending


def test_the_last_policy_is_evaluated_even_off_the_interval():
    config = EvalConfig(interval=4, env=[EvalEnvSpec(id="a", num_examples=1)])
    scheduler = EvalScheduler(config, env_sizes=[1], final_step=6)
    assert scheduler.due(4) and not scheduler.due(5) and scheduler.due(6)
    assert scheduler.final_pending
    scheduler.start(6, lambda: "t0")
    assert not scheduler.final_pending and not scheduler.due(6)
    # Without a last step (no max_steps) only the interval counts.
    assert not EvalScheduler(config, env_sizes=[1]).final_pending
