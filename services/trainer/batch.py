"""Checks a ``TrainBatch`` before anything of it is trained on.

A batch that would crash the step or poison the weights (mismatched lengths,
out-of-vocab ids, NaN advantages, ...) raises :class:`BadBatch` whose text names
the micro-batch, the field and the offending values; the trainer answers with a
negative ``BatchAck`` carrying that text and keeps running.
"""

from __future__ import annotations

import numpy as np

from rlbus.messages import MAX_LOGPROB, MicroBatch, TrainBatch

INTEGER_FIELDS = ("input_ids", "position_ids")
FLOAT_FIELDS = ("advantages", "inference_logprobs", "temperatures")


class BadBatch(ValueError):
    """The batch cannot be trained on; the text says why."""


def check_batch(batch: TrainBatch, rank: int, world_size: int, vocab_size: int, max_positions: int) -> None:
    """Raise :class:`BadBatch` if ``batch`` is not a valid share for this rank."""
    if (batch.rank, batch.world_size) != (rank, world_size):
        raise BadBatch(f"batch is for rank {batch.rank} of {batch.world_size}, this is rank {rank} of {world_size}")
    if not batch.micro_batches:
        raise BadBatch("batch has no micro-batches (pad with zero-loss ones instead)")
    num_local = 0
    for index, micro in enumerate(batch.micro_batches):
        try:
            num_local += check_micro_batch(micro, vocab_size, max_positions)
        except BadBatch as exc:
            raise BadBatch(f"micro-batch {index}: {exc}") from None
    if batch.num_loss_tokens < num_local:
        raise BadBatch(f"num_loss_tokens = {batch.num_loss_tokens} but this share alone has {num_local} loss tokens")


def check_micro_batch(micro: MicroBatch, vocab_size: int, max_positions: int) -> int:
    """Raise :class:`BadBatch` naming the problem; returns the number of loss tokens."""
    arrays = {name: np.asarray(getattr(micro, name)) for name in (*INTEGER_FIELDS, "loss_mask", *FLOAT_FIELDS)}
    lengths = {name: array.shape for name, array in arrays.items()}
    if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) != 1:
        raise BadBatch(f"arrays must be 1-D of one length, got shapes {lengths}")
    if arrays["input_ids"].size == 0:
        raise BadBatch("micro-batch is empty")
    _check_dtypes(arrays)
    ids, positions, mask = arrays["input_ids"], arrays["position_ids"], arrays["loss_mask"]
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise BadBatch(f"input_ids {_show(bad)} are outside the vocabulary [0, {vocab_size})")
    if positions.min() < 0 or positions.max() >= max_positions:
        raise BadBatch(f"position_ids range over [{positions.min()}, {positions.max()}], "
                       f"the model takes [0, {max_positions})")  # fmt: skip
    starts = np.flatnonzero(np.diff(positions, prepend=positions[:1] - 1) != 1)
    if mask[starts].any():
        raise BadBatch(f"loss_mask is set on the first token of a sample (at {_show(starts[mask[starts]])}): "
                       "it has no context to be predicted from")  # fmt: skip
    _check_finite(arrays, mask)
    return int(mask.sum())


def _check_dtypes(arrays: dict[str, np.ndarray]) -> None:
    for name in INTEGER_FIELDS:
        if arrays[name].dtype.kind not in "iu":
            raise BadBatch(f"{name} must be integers, got {arrays[name].dtype}")
    if arrays["loss_mask"].dtype != np.bool_:
        raise BadBatch(f"loss_mask must be bool, got {arrays['loss_mask'].dtype}")
    for name in FLOAT_FIELDS:
        if arrays[name].dtype.kind != "f":
            raise BadBatch(f"{name} must be floats, got {arrays[name].dtype}")


def _check_finite(arrays: dict[str, np.ndarray], mask: np.ndarray) -> None:
    advantages = arrays["advantages"]
    if not np.isfinite(advantages).all():
        raise BadBatch(f"advantages hold non-finite values {_show(advantages[~np.isfinite(advantages)])}")
    logprobs = arrays["inference_logprobs"][mask]
    if not (np.isfinite(logprobs) & (logprobs <= MAX_LOGPROB)).all():
        bad = logprobs[~(np.isfinite(logprobs) & (logprobs <= MAX_LOGPROB))]
        raise BadBatch(f"inference_logprobs of loss tokens must be finite and <= 0, got {_show(bad)}")
    temperatures = arrays["temperatures"][mask]
    if not (np.isfinite(temperatures) & (temperatures > 0)).all():
        bad = temperatures[~(np.isfinite(temperatures) & (temperatures > 0))]
        raise BadBatch(f"temperatures of loss tokens must be finite and > 0, got {_show(bad)}")


def _show(values: np.ndarray, limit: int = 5) -> str:
    """The first few offending values, and how many there are."""
    values = np.asarray(values).reshape(-1)
    head = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{head}{', ...' if values.size > limit else ''}] ({values.size} value(s))"
