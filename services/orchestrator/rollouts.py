"""Rollouts as the orchestrator sees them: validation, summary numbers, token arrays.

A rollout's token sequence is the concatenation over its turns of
``prompt_ids + completion_ids`` (token-in/token-out, never re-tokenised); a
turn with ``starts_sequence`` begins another sequence of the same rollout (a
harness that rewrote its history), trained as a sample of its own.
The loss is taken over completion tokens whose ``completion_mask`` is true;
the sampling logprob sits on those tokens and is 0 everywhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rlbus.messages import MAX_ABS_REWARD, MAX_LOGPROB, Rollout, RolloutResult, Turn

MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32


@dataclass
class PackSample:
    """One trainable sequence, ready for packing. All arrays have length L."""

    input_ids: np.ndarray
    """[L] int32 prompt and completion tokens of every turn."""
    loss_mask: np.ndarray
    """[L] bool, True on trained completion tokens."""
    inference_logprobs: np.ndarray
    """[L] float32 sampling logprob on trained tokens, 0 elsewhere."""
    advantage: float
    temperature: float
    token_advantages: np.ndarray | None = None
    """[L] float32 advantage of each token (``opd``); None gives every token ``advantage``."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def result_problem(
    result: RolloutResult, num_rollouts: int | None = None, max_policy_step: int | None = None
) -> str | None:
    """Why ``result`` cannot be used (naming the rollout, turn and field), or None if it is sound.

    This is the one check at the boundary of what the orchestrator accepts: whatever passes is
    journaled, replayed after a restart and trained on, so every number in it must be finite."""
    if not result.rollouts:
        return "the result holds no rollouts"
    if num_rollouts is not None and len(result.rollouts) != num_rollouts:
        return f"the result holds {len(result.rollouts)} rollouts, the task asked for {num_rollouts}"
    for i, rollout in enumerate(result.rollouts):
        problem = rollout_problem(rollout, max_policy_step)
        if problem is not None:
            return f"rollout {i} ({rollout.rollout_id!r:.80}): {problem}"
    return None


def rollout_problem(rollout: Rollout, max_policy_step: int | None = None) -> str | None:
    problem = numbers_problem(rollout)
    if problem is not None or rollout.error is not None:
        return problem  # errored rollouts are counted and skipped, their tokens are never trained
    if not rollout.turns:
        return "no turns"
    for t, turn in enumerate(rollout.turns):
        problem = turn_problem(turn, max_policy_step)
        if problem is not None:
            return f"turn {t}: {problem}"
    return None


def numbers_problem(rollout: Rollout) -> str | None:
    """Non-finite or out-of-range numbers anywhere in ``rollout`` (errored or not)."""
    if not (math.isfinite(rollout.reward) and abs(rollout.reward) <= MAX_ABS_REWARD):
        return f"reward {rollout.reward} is not finite or exceeds {MAX_ABS_REWARD:g} in magnitude"
    for name in ("reward_breakdown", "metrics", "timing"):
        bad = {key: value for key, value in getattr(rollout, name).items() if not math.isfinite(value)}
        if bad:
            return f"{name} holds non-finite values {dict(list(bad.items())[:3])}"
    for t, turn in enumerate(rollout.turns):
        for name in ("completion_logprobs", "teacher_logprobs"):
            bad = [lp for lp in getattr(turn, name) or [] if not math.isfinite(lp)]
            if bad:
                return f"turn {t}: {name} must be finite, got {bad[:3]}"
    return None


def turn_problem(turn: Turn, max_policy_step: int | None) -> str | None:
    lengths = (len(turn.completion_ids), len(turn.completion_logprobs), len(turn.completion_mask))
    if len(set(lengths)) != 1:
        return f"completion_ids, completion_logprobs, completion_mask have lengths {lengths}"
    ids = turn.prompt_ids + turn.completion_ids
    if ids and not 0 <= min(ids) <= max(ids) <= MAX_TOKEN_ID:
        return f"token ids must be in [0, {MAX_TOKEN_ID}], got {min(ids)}..{max(ids)}"
    if turn.policy_step < 0 or (max_policy_step is not None and turn.policy_step > max_policy_step):
        return f"policy_step {turn.policy_step} is outside 0..{max_policy_step} (no such policy exists yet)"
    bad = [lp for lp, m in zip(turn.completion_logprobs, turn.completion_mask) if m and lp > MAX_LOGPROB]
    if bad:
        return f"completion_logprobs of trained tokens must be finite and <= 0, got {bad[:3]}"
    return teacher_problem(turn)


def teacher_problem(turn: Turn) -> str | None:
    """What is wrong with the turn's teacher logprobs, when it has them."""
    teacher = turn.teacher_logprobs
    if teacher is None:
        return None
    if len(teacher) != len(turn.completion_ids):
        return f"{len(teacher)} teacher_logprobs for {len(turn.completion_ids)} completion tokens"
    bad = [lp for lp in teacher if not (math.isfinite(lp) and lp <= MAX_LOGPROB)]
    if bad:
        return f"teacher_logprobs must be finite and <= 0, got {bad[:3]}"
    return None


def branched_problem(result: RolloutResult) -> str | None:
    """A rollout of several token sequences where the mode trains one per rollout (``opd`` and ``sft``:
    the teacher scores or answers one sequence)."""
    for i, rollout in enumerate(result.rollouts):
        if rollout.error is None and any(t.starts_sequence for t in rollout.turns[1:]):
            return (f"rollout {i} ({rollout.rollout_id!r:.80}) holds {len(sequences(rollout))} token sequences, "
                    "but only training_mode = 'rl' trains several sequences per rollout")  # fmt: skip
    return None


def unscored_problem(result: RolloutResult) -> str | None:
    """An ``opd`` result whose sound rollouts the teacher did not score (an env-worker without
    ``[env_worker.teacher]``, or one too old to know ``training_mode``)."""
    for i, rollout in enumerate(result.rollouts):
        if rollout.error is None and any(t.teacher_logprobs is None for t in rollout.turns):
            return (f"rollout {i} ({rollout.rollout_id!r:.80}) has no teacher_logprobs, but training_mode = 'opd' "
                    "trains on them: give the env-worker [env_worker.teacher]")  # fmt: skip
    return None


def oldest_policy_step(rollout: Rollout) -> int:
    """The oldest policy that sampled any turn of ``rollout`` (decides its staleness)."""
    return min((turn.policy_step for turn in rollout.turns), default=0)


def finish_reason(rollout: Rollout) -> str:
    """Why the rollout ended: ``error``, or its last turn's reason (``stop``, ``length`` ...)."""
    if rollout.error is not None:
        return "error"
    return rollout.turns[-1].finish_reason if rollout.turns else "none"


def num_completion_tokens(rollout: Rollout) -> int:
    return sum(len(turn.completion_ids) for turn in rollout.turns)


def num_tokens(rollout: Rollout) -> int:
    return sum(len(turn.prompt_ids) + len(turn.completion_ids) for turn in rollout.turns)


def length_fraction(rollout: Rollout, max_tokens: int) -> float:
    """Completion tokens over what the rollout's turns could have sampled."""
    return num_completion_tokens(rollout) / (max_tokens * max(1, len(rollout.turns)))


def sequences(rollout: Rollout) -> list[list[Turn]]:
    """The rollout's turns split where a new token sequence starts (one list for most rollouts)."""
    split: list[list[Turn]] = []
    for turn in rollout.turns:
        if turn.starts_sequence or not split:
            split.append([])
        split[-1].append(turn)
    return split


def to_samples(rollout: Rollout, advantage: float, temperature: float) -> list[PackSample]:
    """One sample per token sequence of a validated rollout, each with the rollout's advantage."""
    return [_sample_of(turns, advantage, temperature) for turns in sequences(rollout)]


def to_sample(rollout: Rollout, advantage: float, temperature: float) -> PackSample:
    """The token arrays of a validated rollout of one sequence (``branched_problem`` refused others)."""
    return _sample_of(rollout.turns, advantage, temperature)


def _sample_of(turns: list[Turn], advantage: float, temperature: float) -> PackSample:
    ids, mask, logprobs = [], [], []
    for turn in turns:
        ids += turn.prompt_ids + turn.completion_ids
        mask += [False] * len(turn.prompt_ids) + list(turn.completion_mask)
        logprobs += [0.0] * len(turn.prompt_ids) + list(turn.completion_logprobs)
    loss_mask = np.asarray(mask, dtype=bool)
    # The first token has no context to be predicted from (a rollout without prompt tokens).
    loss_mask[:1] = False
    inference_logprobs = np.where(loss_mask, np.asarray(logprobs, dtype=np.float32), np.float32(0))
    return PackSample(
        input_ids=np.asarray(ids, dtype=np.int32), loss_mask=loss_mask,
        inference_logprobs=inference_logprobs.astype(np.float32), advantage=advantage, temperature=temperature,
    )  # fmt: skip
