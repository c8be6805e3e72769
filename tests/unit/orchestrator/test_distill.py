"""The teacher modes in the orchestrator: opd's per-token advantages and KL metric, sft's batches,
the tasks' mode, and the config errors of a mode without its teacher."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
from pydantic import ValidationError

from rlbus.config import to_toml
from rlbus.messages import Rollout, RolloutResult, Turn
from rlbus.services.orchestrator.buffer import Group
from rlbus.services.orchestrator.builder import build_step
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.sampler import Draw

from .fakes import roll_out
from .test_core import load_policy, make_config, make_core, request_tasks

TEACHER = {"client": {"base_url": "http://127.0.0.1:8001/v1", "model": "teacher"}}


def config(mode: str, **overrides) -> OrchestratorConfig:
    values = {
        "batch_size": 2,
        "rollouts_per_example": 2,
        "seq_len": 64,
        "training_mode": mode,
        "teacher": TEACHER,
        "train": {"env": [{"id": "a"}]},
    }
    return OrchestratorConfig(**{**values, **overrides})


def rollout(reward: float, student: list[float], teacher: list[float] | None, index: int = 0) -> Rollout:
    n = len(student)
    turn = Turn(prompt_ids=[1, 2, 3], completion_ids=list(range(10, 10 + n)), completion_logprobs=student,
                completion_mask=[True] * n, policy_step=0, teacher_logprobs=teacher)  # fmt: skip
    return Rollout(rollout_id=f"t/{index}", turns=[turn], reward=reward)


def group(*rollouts: Rollout) -> Group:
    return Group("t", "a", Draw(0, 0), list(rollouts))


def trained(batch) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, input ids) of the loss tokens of a one-rank batch."""
    mbs = batch.micro_batches
    mask = np.concatenate([mb.loss_mask for mb in mbs])
    return np.concatenate([mb.advantages for mb in mbs])[mask], np.concatenate([mb.input_ids for mb in mbs])[mask]


def test_opd_advantage_of_each_token_is_the_teachers_logprob_minus_the_students() -> None:
    student_a, teacher_a = [-1.0, -2.0, -0.5], [-0.2, -3.0, -0.5]
    student_b, teacher_b = [-0.1, -0.1], [-1.1, -0.6]
    # Equal rewards: RL would drop this group (no signal); opd trains every token of it.
    built = build_step(1, [group(rollout(1.0, student_a, teacher_a), rollout(1.0, student_b, teacher_b, 1))],
                       config("opd"))  # fmt: skip
    (batch,) = built.batches
    advantages, ids = trained(batch)
    expected = {10: [0.8, -1.0, 0.0], 11: [-1.0, -0.5]}  # by the sample's first token id (10 + length)
    by_id = dict(zip(ids.tolist(), advantages.tolist()))
    assert sorted(advantages.tolist()) == pytest.approx(sorted(expected[10] + expected[11]))
    assert by_id[12] == pytest.approx(0.0) and batch.training_mode == "opd"
    # Prompt tokens carry nothing.
    mb = batch.micro_batches[0]
    assert np.all(mb.advantages[~mb.loss_mask] == 0)
    kl = np.mean([s - t for s, t in zip(student_a + student_b, teacher_a + teacher_b)])
    assert built.metrics["opd/teacher_kl/mean"] == pytest.approx(kl)
    assert built.metrics["dropped/zero_advantage_groups"] == 0


def test_opd_mixes_in_the_group_advantage_by_reward_weight() -> None:
    student, teacher = [-1.0, -1.0], [-1.5, -0.5]
    cfg = config("opd", teacher={**TEACHER, "reward_weight": 0.5})
    built = build_step(1, [group(rollout(1.0, student, teacher), rollout(0.0, student, teacher, 1))], cfg)
    advantages, _ = trained(built.batches[0])
    # Group advantages are +0.5 and -0.5 (reward minus the mean); each token adds 0.5 of its rollout's.
    assert sorted(advantages.tolist()) == pytest.approx(sorted([-0.5 + 0.25, 0.5 + 0.25, -0.5 - 0.25, 0.5 - 0.25]))


def test_sft_trains_the_teachers_rollouts_above_the_threshold_with_the_nll() -> None:
    cfg = config("sft", teacher={**TEACHER, "reward_threshold": 0.5})
    built = build_step(1, [group(rollout(0.9, [0.0] * 3, None), rollout(0.2, [0.0] * 2, None, 1))], cfg)
    (batch,) = built.batches
    assert batch.training_mode == "sft" and batch.num_loss_tokens == 3
    assert built.metrics["dropped/below_reward_threshold"] == 1
    assert built.metrics["reward/all/mean"] == pytest.approx(0.55)  # the teacher's reward, both rollouts
    assert "off_policy/mean" not in built.metrics  # a teacher is no policy step


def test_tasks_carry_the_mode_and_opd_results_without_teacher_logprobs_are_refused(tmp_path) -> None:
    core = make_core(make_config(tmp_path, training_mode="opd", teacher=TEACHER, max_steps=2))
    load_policy(core, 0)
    tasks = request_tasks(core)
    assert tasks and all(t.training_mode == "opd" for t in tasks)
    unscored = roll_out(tasks[0], 0)
    ack = core.on_result(unscored)
    assert not ack.accepted and "has no teacher_logprobs" in ack.reason and "[env_worker.teacher]" in ack.reason
    scored = roll_out(tasks[1], 0)
    for r in scored.rollouts:
        r.turns[0].teacher_logprobs = [-0.1] * len(r.turns[0].completion_ids)
    assert core.on_result(scored).accepted


def test_bad_teacher_logprobs_are_refused(tmp_path) -> None:
    core = make_core(make_config(tmp_path, training_mode="opd", teacher=TEACHER))
    load_policy(core, 0)
    task = request_tasks(core)[0]
    for bad, why in (([-0.1], "1 teacher_logprobs for 3 completion tokens"), ([-0.1, 0.5, -0.1], "<= 0"),
                     ([-0.1, float("nan"), -0.1], "must be finite")):  # fmt: skip
        result: RolloutResult = roll_out(task, 0)
        for r in result.rollouts:
            r.turns[0].teacher_logprobs = bad
        ack = core.on_result(result)
        assert not ack.accepted and why in ack.reason, ack.reason
        task = request_tasks(core)[0]


@pytest.mark.parametrize(("mode", "steps_built"), [("sft", 4), ("rl", 1)])
def test_sft_results_never_go_stale(tmp_path, mode: str, steps_built: int) -> None:
    teacher = {"teacher": TEACHER} if mode == "sft" else {}
    core = make_core(make_config(tmp_path, training_mode=mode, max_off_policy_steps=0, max_async_level=5,
                                 max_steps=6, **teacher))  # fmt: skip
    load_policy(core, 0)
    refused = []
    for _ in range(4):
        tasks = request_tasks(core)
        assert all(t.training_mode == mode for t in tasks)
        for task in tasks:  # a teacher's turns say policy 0, whatever the step
            ack = core.on_result(roll_out(task, 0))
            refused += [] if ack.accepted else [ack.reason]
        core.tick()
    # RL refuses groups of policy 0 after the first step (max_off_policy_steps = 0); SFT trains on.
    assert core.step - 1 == steps_built
    assert all(reason.startswith("stale") for reason in refused) and bool(refused) == (mode == "rl")


@pytest.mark.parametrize(("values", "message"), [
    ({"training_mode": "opd"}, "training_mode = 'opd' needs a teacher"),
    ({"training_mode": "sft"}, "training_mode = 'sft' needs a teacher"),
    ({"teacher": TEACHER}, "training_mode = 'rl' never asks it"),
    ({"training_mode": "opd", "teacher": {**TEACHER, "reward_threshold": 0.5}}, "teacher.reward_threshold = 0.5 is not used"),
    ({"training_mode": "sft", "teacher": {**TEACHER, "reward_weight": 0.5}}, "teacher.reward_weight = 0.5 is not used"),
    ({"training_mode": "opd", "teacher": {"client": {"base_url": "localhost:8001", "model": "t"}}}, "not an http"),
    ({"training_mode": "distill"}, "training_mode"),
])  # fmt: skip
def test_a_mode_without_its_teacher_or_with_a_misplaced_setting_is_a_config_error(values, message) -> None:
    with pytest.raises(ValidationError, match=message):
        OrchestratorConfig(**values)


@pytest.mark.parametrize("mode", ["opd", "sft"])
def test_a_resolved_teacher_config_loads_back(mode) -> None:
    # What `rlbus rl` writes for the orchestrator holds every default; the service must read it again.
    written = OrchestratorConfig(training_mode=mode, teacher=TEACHER)
    values = tomllib.loads(to_toml(written))
    assert values["teacher"]["client"]["base_url"] == TEACHER["client"]["base_url"]
    assert OrchestratorConfig(**values).teacher == written.teacher
