"""The env-worker's own check of a result before it is sent: nothing the orchestrator would refuse.

The orchestrator refuses a result it cannot decode or that holds a number it cannot train on or
journal (see ``services/orchestrator/rollouts.py``); the task is then lost to this worker's work.
Checked here first, each bad rollout becomes an errored one whose ``error`` names the field, so
the task still completes and its good rollouts still count. The checks:

- a round trip through ``rlbus.codec`` with the bus's decode limits, as the orchestrator decodes it
  (field types, encodable strings and integers, message size);
- reward finite and at most ``MAX_ABS_REWARD`` in magnitude; reward_breakdown, metrics and timing
  finite;
- per turn: completion ids, logprobs and mask of one length; token ids in [0, 2**31 - 1] (int32);
  policy_step >= 0; every logprob finite, trained ones at most ``MAX_LOGPROB``; teacher logprobs
  (``opd``), when present, one per completion token, finite and at most ``MAX_LOGPROB``;
- as many rollouts as the task asked for.
"""

from __future__ import annotations

import msgspec
import numpy as np

from rlbus import codec
from rlbus.config.base import BusConfig
from rlbus.messages import MAX_ABS_REWARD, MAX_LOGPROB, Rollout, RolloutResult, Turn

MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32
MAX_ERROR_CHARS = 2000
"""Longest ``Rollout.error`` sent: an exception's text can be anything, even megabytes."""


def checked_result(result: RolloutResult, num_rollouts: int, bus: BusConfig) -> tuple[RolloutResult, int]:
    """``result`` as the orchestrator will decode it, each rollout it would refuse replaced by an
    errored rollout naming the problem; and how many rollouts were replaced."""
    if len(result.rollouts) != num_rollouts:
        reason = f"the environment returned {len(result.rollouts)} rollouts for a task of {num_rollouts}"
        return replaced(result, [bare(result, i, reason) for i in range(num_rollouts)]), num_rollouts
    rollouts = [checked_rollout(result, i, rollout, bus) for i, rollout in enumerate(result.rollouts)]
    num_replaced = sum(checked is not decoded for checked, decoded in rollouts)
    checked = replaced(result, [rollout for rollout, _ in rollouts])
    try:
        return round_trip(checked, bus), num_replaced
    except Exception as exc:  # noqa: BLE001 - each rollout fits but not all together: the message is too large
        reason = f"the result cannot be sent: {type(exc).__name__}: {exc}"
        return replaced(result, [bare(result, i, reason) for i in range(num_rollouts)]), num_rollouts


def checked_rollout(result: RolloutResult, index: int, rollout: Rollout, bus: BusConfig) -> tuple[Rollout, Rollout]:
    """(what to send, the decoded rollout): the same object when the rollout is sound."""
    try:
        decoded = round_trip(replaced(result, [rollout]), bus).rollouts[0]
    except Exception as exc:  # noqa: BLE001 - whatever breaks encoding or decoding is named in the error
        return bare(result, index, f"invalid rollout, not sent: {type(exc).__name__}: {exc}", rollout.error), rollout
    problem = rollout_problem(decoded)
    if problem is None:
        return decoded, decoded
    return bare(result, index, f"invalid rollout, not sent: {problem}", decoded.error), decoded


def round_trip(result: RolloutResult, bus: BusConfig) -> RolloutResult:
    """``result`` encoded and decoded back as the orchestrator reads it (DecodeError, or the
    encoder's error, says what does not fit the schema)."""
    return codec.decode(
        codec.encode(result), RolloutResult, max_frames=bus.max_frames, max_header_bytes=bus.max_header_bytes,
        max_frame_bytes=bus.max_frame_bytes, max_payload_bytes=bus.max_payload_bytes,
    )  # fmt: skip


def rollout_problem(rollout: Rollout) -> str | None:
    """What the orchestrator would refuse in a decoded ``rollout``, naming the field; None if nothing."""
    if not (np.isfinite(rollout.reward) and abs(rollout.reward) <= MAX_ABS_REWARD):
        return f"reward is {rollout.reward!r}, not a finite number of magnitude at most {MAX_ABS_REWARD:g}"
    for name in ("reward_breakdown", "metrics", "timing"):
        for key, value in getattr(rollout, name).items():
            if not np.isfinite(value):
                return f"{name}[{key!r}] is {value!r}, not finite"
    if rollout.error is None and not rollout.turns:
        return "turns is empty"
    for t, turn in enumerate(rollout.turns):
        problem = turn_problem(turn)
        if problem is not None:
            return f"turns[{t}].{problem}"
    return None


def turn_problem(turn: Turn) -> str | None:
    lengths = (len(turn.completion_ids), len(turn.completion_logprobs), len(turn.completion_mask))
    if len(set(lengths)) != 1:
        return f"completion_ids, completion_logprobs, completion_mask have lengths {lengths}"
    for name in ("prompt_ids", "completion_ids"):
        ids = getattr(turn, name)
        if ids and not 0 <= min(ids) <= max(ids) <= MAX_TOKEN_ID:
            bad = min(ids) if min(ids) < 0 else max(ids)
            return f"{name} holds {bad}, outside the int32 token ids [0, {MAX_TOKEN_ID}]"
    if turn.policy_step < 0:
        return f"policy_step is {turn.policy_step}, negative"
    logprobs = np.asarray(turn.completion_logprobs, dtype=np.float64)
    trained = np.asarray(turn.completion_mask, dtype=bool)
    bad_at = np.flatnonzero(~np.isfinite(logprobs) | (trained & (logprobs > MAX_LOGPROB)))
    if bad_at.size:
        j = int(bad_at[0])
        return f"completion_logprobs[{j}] is {float(logprobs[j])!r}: logprobs must be finite, trained ones <= {MAX_LOGPROB:g}"
    return teacher_problem(turn)


def teacher_problem(turn: Turn) -> str | None:
    """The teacher's logprobs (``opd``), when present: one per completion token, finite, at most ``MAX_LOGPROB``."""
    if turn.teacher_logprobs is None:
        return None
    if len(turn.teacher_logprobs) != len(turn.completion_ids):
        return f"teacher_logprobs has {len(turn.teacher_logprobs)} values for {len(turn.completion_ids)} tokens"
    teacher = np.asarray(turn.teacher_logprobs, dtype=np.float64)
    bad_at = np.flatnonzero(~np.isfinite(teacher) | (teacher > MAX_LOGPROB))
    if bad_at.size:
        j = int(bad_at[0])
        return f"teacher_logprobs[{j}] is {float(teacher[j])!r}: logprobs must be finite and <= {MAX_LOGPROB:g}"
    return None


def bare(result: RolloutResult, index: int, reason: str, earlier_error: str | None = None) -> Rollout:
    """An errored rollout holding nothing but its reason (whatever else it held may be the culprit)."""
    if isinstance(earlier_error, str):
        reason = f"{reason} (it had errored: {earlier_error})"
    # Escaped, since a text that cannot be encoded (a lone surrogate) may be the very problem.
    reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(reason) > MAX_ERROR_CHARS:
        reason = reason[: MAX_ERROR_CHARS - 3] + "..."
    return Rollout(rollout_id=f"{result.task_id}/{index}", turns=[], reward=0.0, error=reason)


def replaced(result: RolloutResult, rollouts: list[Rollout]) -> RolloutResult:
    return msgspec.structs.replace(result, rollouts=rollouts)
