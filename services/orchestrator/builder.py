"""One training step's batch from scored groups: advantages, samples, packing, metrics.

Within each group: errored rollouts are left out (and counted), the others
get advantages from their rewards (:mod:`rlbus.services.orchestrator.advantages`).
A group whose advantages are all zero is dropped and counted; so is a
rollout without a trained token (e.g. an empty completion). What is left
is packed into one ``TrainBatch`` per trainer rank. The teacher modes
(``training_mode`` ``opd`` and ``sft``) make their samples in
:mod:`rlbus.services.orchestrator.distill`.

Reward, length and staleness metrics cover every non-errored rollout of the
step's groups, dropped ones included: they describe what the policy did.
Beside the weighted ``reward/<env>/*``, ``reward/<env>/<function>/mean`` is each reward
function's unweighted mean (``Rollout.reward_breakdown``): which part of the rubric moves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rlbus.messages import Rollout, RolloutSamples, Sample, TrainBatch
from rlbus.services.orchestrator.advantages import group_advantages, has_signal, penalised_rewards
from rlbus.services.orchestrator.buffer import Group
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.distill import TeacherTally, opd_sample, sft_samples
from rlbus.services.orchestrator.packing import pack_batch
from rlbus.services.orchestrator.rollouts import (
    PackSample,
    finish_reason,
    length_fraction,
    num_completion_tokens,
    num_tokens,
    oldest_policy_step,
    to_samples,
)


@dataclass
class BuiltStep:
    step: int
    batches: list[TrainBatch]
    """One per trainer rank."""
    metrics: dict[str, float]
    samples: list[Sample]
    num_samples: int = 0
    num_tokens: int = 0
    num_problems: int = 0


@dataclass
class _Tally:
    """Per-rollout numbers of one step, for its metrics."""

    rewards: dict[str, list[float]] = field(default_factory=dict)
    reward_functions: dict[str, list[float]] = field(default_factory=dict)
    """``<env_id>/<reward function>`` -> unweighted values (``Rollout.reward_breakdown``)."""
    completion_tokens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    off_policy: list[int] = field(default_factory=list)
    sampled_steps: list[int] = field(default_factory=list)
    num_empty: int = 0
    num_errored: int = 0
    num_zero_advantage_groups: int = 0
    num_no_loss_rollouts: int = 0
    teacher: TeacherTally = field(default_factory=TeacherTally)


def build_step(step: int, groups: Sequence[Group], config: OrchestratorConfig) -> BuiltStep:
    """Turn ``groups`` into the per-rank batches of ``step`` and the step's metrics."""
    tally, samples, shown = _Tally(), [], []
    for group in groups:
        samples += _group_samples(step, group, config, tally, shown)
    started = time.perf_counter()
    batches, stats = pack_batch(samples, step, config.seq_len, config.trainer_world_size,
                                config.sampling.temperature)  # fmt: skip
    metrics = _metrics(tally) | tally.teacher.metrics(config.training_mode)
    metrics |= {
        "time/pack": time.perf_counter() - started,
        "batch/num_samples": float(len(samples)),
        "batch/num_problems": float(len(groups)),
        "batch/num_tokens": float(stats.num_tokens),
        "batch/num_loss_tokens": float(stats.num_loss_tokens),
        "batch/num_micro_batches": float(stats.num_rows),
        "batch/num_padding_micro_batches": float(stats.num_padding_rows),
        "batch/num_truncated_samples": float(stats.num_truncated_samples),
    }
    for batch in batches:
        batch.metrics = {k: v for k, v in metrics.items() if k.startswith(("batch/", "off_policy/"))}
        batch.task_ids = [group.task_id for group in groups]
        batch.training_mode = config.training_mode
    return BuiltStep(step, batches, metrics, shown[: config.samples_per_report], len(samples), stats.num_tokens,
                     len(groups))


def _group_samples(step: int, group: Group, config: OrchestratorConfig, tally: _Tally,
                   shown: list[Sample]) -> list[PackSample]:  # fmt: skip
    ok = [r for r in group.rollouts if r.error is None]
    tally.num_errored += len(group.rollouts) - len(ok)
    for rollout in ok:
        tally.rewards.setdefault(group.env_id, []).append(rollout.reward)
        for name, value in rollout.reward_breakdown.items():
            tally.reward_functions.setdefault(f"{group.env_id}/{name}", []).append(value)
        tally.completion_tokens.append(num_completion_tokens(rollout))
        tally.seq_lens.append(num_tokens(rollout))
        tally.truncated.append(rollout.is_truncated)
        tally.turns.append(len(rollout.turns))
        if config.training_mode != "sft":  # a teacher's rollouts are no policy's: staleness means nothing
            tally.off_policy.append(group.off_policy(step))
            tally.sampled_steps.append(group.oldest_policy_step)
        tally.num_empty += tally.completion_tokens[-1] == 0
    if not ok:
        return []
    temperature = config.sampling.temperature
    if config.training_mode == "sft":
        shown.append(shown_sample(group.env_id, ok[0], 0.0))
        threshold = config.teacher.reward_threshold if config.teacher else None
        return _with_loss_tokens(sft_samples(ok, threshold, temperature, tally.teacher), tally)
    fractions = [length_fraction(r, config.sampling.max_tokens) for r in ok]
    rewards = penalised_rewards([r.reward for r in ok], fractions, config.advantage.length_penalty)
    advantages = group_advantages(rewards, config.advantage)
    shown.append(shown_sample(group.env_id, ok[0], float(advantages[0])))
    if config.training_mode == "opd":
        weight = config.teacher.reward_weight if config.teacher else 0.0
        return _with_loss_tokens([opd_sample(rollout, advantage, weight, temperature, tally.teacher)
                                  for rollout, advantage in zip(ok, advantages.tolist())], tally)  # fmt: skip
    if not has_signal(advantages):
        tally.num_zero_advantage_groups += 1
        return []
    samples = [sample for rollout, advantage in zip(ok, advantages.tolist())
               for sample in to_samples(rollout, advantage, temperature)]  # fmt: skip
    return _with_loss_tokens(samples, tally)


def _with_loss_tokens(samples: list[PackSample], tally: _Tally) -> list[PackSample]:
    """``samples`` less those without a trained token (counted: e.g. an empty completion)."""
    kept = [sample for sample in samples if sample.num_loss_tokens]
    tally.num_no_loss_rollouts += len(samples) - len(kept)
    return kept


def shown_sample(env_id: str, rollout: Rollout, advantage: float) -> Sample:
    """``rollout`` as people see it in samples.jsonl and W&B tables."""
    num_completion = num_completion_tokens(rollout)
    return Sample(
        env_id=env_id, prompt=rollout.prompt_text, completion=rollout.completion_text, reward=rollout.reward,
        advantage=advantage, answer=rollout.answer, finish_reason=finish_reason(rollout),
        num_prompt_tokens=num_tokens(rollout) - num_completion, num_completion_tokens=num_completion,
        policy_step=oldest_policy_step(rollout),
    )  # fmt: skip


def _stats(prefix: str, values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    return {f"{prefix}/mean": float(array.mean()), f"{prefix}/std": float(array.std()),
            f"{prefix}/min": float(array.min()), f"{prefix}/max": float(array.max())}  # fmt: skip


def _metrics(tally: _Tally) -> dict[str, float]:
    metrics = _stats("reward/all", [r for rewards in tally.rewards.values() for r in rewards])
    for env_id, rewards in sorted(tally.rewards.items()):
        metrics |= _stats(f"reward/{env_id}", rewards)
    for env_function, values in sorted(tally.reward_functions.items()):
        metrics[f"reward/{env_function}/mean"] = float(np.mean(values))
    metrics |= _stats("num_completion_tokens", tally.completion_tokens)
    if tally.completion_tokens:
        metrics["num_completion_tokens/sum"] = float(np.sum(tally.completion_tokens))
    metrics |= _stats("seq_len", tally.seq_lens)
    metrics |= _stats("num_turns", tally.turns)
    if tally.truncated:
        metrics["is_truncated/mean"] = float(np.mean(tally.truncated))
    if tally.off_policy:
        metrics["off_policy/mean"] = float(np.mean(tally.off_policy))
        metrics["off_policy/max"] = float(np.max(tally.off_policy))
        # Which weights sampled the batch: shows that new policies reach inference.
        metrics["policy/sampled_step/min"] = float(np.min(tally.sampled_steps))
        metrics["policy/sampled_step/max"] = float(np.max(tally.sampled_steps))
    metrics |= {
        "empty_rollouts": float(tally.num_empty),
        "errored_rollouts": float(tally.num_errored),
        "dropped/zero_advantage_groups": float(tally.num_zero_advantage_groups),
        "dropped/no_loss_rollouts": float(tally.num_no_loss_rollouts),
    }
    return metrics


def samples_report(built: BuiltStep) -> RolloutSamples:
    return RolloutSamples(step=built.step, samples=built.samples)
