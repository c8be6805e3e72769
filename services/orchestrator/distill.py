"""Samples of the teacher modes: on-policy distillation (``opd``) and SFT from a teacher (``sft``).

``opd`` (Agarwal et al. 2024; Thinking Machines' "On-Policy Distillation", 2025): the student
samples, the teacher scores each sampled token (``Turn.teacher_logprobs``, from the env-worker),
and every completion token t gets the advantage

    A_t = log p_teacher(x_t | x_<t) - log p_student(x_t | x_<t) + reward_weight * A_group

where ``log p_student`` is the sampling logprob. The trainer's policy-gradient loss (``-A * ratio``)
then raises the probability of tokens the teacher likes more than the student does and lowers the
others: its expected gradient is that of the per-token reverse KL(student || teacher), which it
minimises. ``opd/teacher_kl/mean`` is the mean of ``log p_student - log p_teacher`` over the step's
trained tokens: a one-sample estimate of that KL per token. Unlike RL, a group whose rewards are
all equal still trains (its tokens carry the teacher's signal).

``sft``: the rollouts were sampled by the teacher; they are trained as they are (negative
log-likelihood, ``TrainBatch.training_mode``), less those below ``teacher.reward_threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlbus.messages import Rollout
from rlbus.services.orchestrator.rollouts import PackSample, to_sample


@dataclass
class TeacherTally:
    """What the teacher modes add to a step's metrics."""

    kl_sum: float = 0.0
    """Sum over trained tokens of ``student logprob - teacher logprob``."""
    num_kl_tokens: int = 0
    num_below_threshold: int = 0

    def metrics(self, training_mode: str) -> dict[str, float]:
        if training_mode == "opd" and self.num_kl_tokens:
            return {"opd/teacher_kl/mean": self.kl_sum / self.num_kl_tokens}
        if training_mode == "sft":
            return {"dropped/below_reward_threshold": float(self.num_below_threshold)}
        return {}


def teacher_logprobs(rollout: Rollout) -> np.ndarray:
    """[L] the teacher's logprob of each token of the rollout's sequence (0 on prompt tokens)."""
    values: list[float] = []
    for turn in rollout.turns:
        if turn.teacher_logprobs is None:
            raise ValueError(f"rollout {rollout.rollout_id!r} has a turn the teacher did not score")
        values += [0.0] * len(turn.prompt_ids) + list(turn.teacher_logprobs)
    return np.asarray(values, dtype=np.float64)


def opd_sample(rollout: Rollout, group_advantage: float, reward_weight: float, temperature: float,
               tally: TeacherTally) -> PackSample:  # fmt: skip
    """The rollout's sample with per-token advantages ``teacher - student + reward_weight * A_group``."""
    sample = to_sample(rollout, group_advantage, temperature)
    mask = sample.loss_mask
    # Both logprobs are 0 off the mask, so the gap is too; the reward's share goes on trained tokens only.
    gap = teacher_logprobs(rollout) - sample.inference_logprobs.astype(np.float64)
    advantages = np.where(mask, gap + reward_weight * group_advantage, 0.0)
    sample.token_advantages = advantages.astype(np.float32)
    tally.kl_sum += float(-gap[mask].sum())
    tally.num_kl_tokens += int(mask.sum())
    return sample


def sft_samples(rollouts: Sequence[Rollout], reward_threshold: float | None, temperature: float,
                tally: TeacherTally) -> list[PackSample]:  # fmt: skip
    """The teacher's rollouts to learn, those below ``reward_threshold`` left out (and counted)."""
    kept = [r for r in rollouts if reward_threshold is None or r.reward >= reward_threshold]
    tally.num_below_threshold += len(rollouts) - len(kept)
    # The advantage is unused by the SFT loss; 0 keeps it out of any sum it could bias.
    return [to_sample(rollout, 0.0, temperature) for rollout in kept]
