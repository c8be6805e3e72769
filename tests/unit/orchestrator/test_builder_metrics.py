"""A built step's metrics and shown samples: per-reward-function means, completion tokens,
truncation, and the sample fields people read in samples.jsonl."""

import pytest

from rlbus.messages import Rollout, Turn
from rlbus.services.orchestrator.buffer import Group
from rlbus.services.orchestrator.builder import build_step
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.sampler import Draw


def turn(num_prompt: int, num_completion: int, policy_step: int, finish_reason: str = "stop") -> Turn:
    return Turn(prompt_ids=[1] * num_prompt, completion_ids=[7] * num_completion,
                completion_logprobs=[-0.5] * num_completion, completion_mask=[True] * num_completion,
                policy_step=policy_step, finish_reason=finish_reason)  # fmt: skip


def rollout(index: int, reward: float, breakdown: dict[str, float], turns: list[Turn], **fields) -> Rollout:
    return Rollout(rollout_id=f"t/{index}", turns=turns, reward=reward, reward_breakdown=breakdown,
                   prompt_text="2+2?", completion_text="<answer>4</answer>", **fields)  # fmt: skip


def group(env_id: str, rollouts: list[Rollout]) -> Group:
    return Group(f"task-{env_id}", env_id, Draw(0, 0), rollouts)


def config(tmp_path) -> OrchestratorConfig:
    return OrchestratorConfig(batch_size=4, rollouts_per_example=2, seq_len=64, max_steps=3, output_dir=tmp_path,
                              train={"env": [{"id": "math", "ratio": 1.0}, {"id": "words", "ratio": 1.0}]})  # fmt: skip


def test_reward_functions_completion_tokens_and_truncation_are_step_metrics(tmp_path):
    math_group = group("math", [
        rollout(0, 1.0, {"correct": 1.0, "format": 1.0}, [turn(4, 3, 2)], answer="4"),
        rollout(1, 0.0, {"correct": 0.0, "format": 0.5}, [turn(4, 5, 2, "length")], is_truncated=True),
    ])  # fmt: skip
    words_group = group("words", [
        rollout(0, 0.2, {"overlap": 0.2}, [turn(3, 2, 1), turn(2, 2, 2)]),
        rollout(1, 0.6, {"overlap": 0.6}, [turn(3, 4, 1)]),
        Rollout(rollout_id="t/2", turns=[], reward=0.0, error="env raised"),  # errored: in no metric
    ])  # fmt: skip
    metrics = build_step(1, [math_group, words_group], config(tmp_path)).metrics
    assert metrics["reward/math/correct/mean"] == 0.5
    assert metrics["reward/math/format/mean"] == 0.75
    assert metrics["reward/words/overlap/mean"] == pytest.approx(0.4)
    assert metrics["num_completion_tokens/sum"] == 3 + 5 + 4 + 4
    assert metrics["num_completion_tokens/mean"] == 4.0
    assert metrics["is_truncated/mean"] == 0.25


def test_shown_samples_carry_answer_finish_reason_token_counts_and_policy_step(tmp_path):
    solved = rollout(0, 1.0, {}, [turn(4, 3, policy_step=2, finish_reason="length")], answer="4")
    missed = rollout(1, 0.0, {}, [turn(4, 5, 2)])
    multi_turn = rollout(0, 0.2, {}, [turn(3, 2, policy_step=1), turn(2, 2, policy_step=2)])
    other = rollout(1, 0.6, {}, [turn(3, 4, 2)])
    built = build_step(3, [group("math", [solved, missed]), group("words", [multi_turn, other])], config(tmp_path))
    first, second = built.samples
    assert (first.answer, first.finish_reason, first.num_prompt_tokens, first.num_completion_tokens,
            first.policy_step) == ("4", "length", 4, 3, 2)  # fmt: skip
    # Environment replies of later turns count as prompt tokens; the oldest sampling policy is the one shown.
    assert (second.answer, second.finish_reason, second.num_prompt_tokens, second.num_completion_tokens,
            second.policy_step) == (None, "stop", 5, 4, 1)  # fmt: skip
