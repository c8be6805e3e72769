"""Checks a ``TrainBatch`` before anything of it is trained on.

A batch whose shape would crash the step (mismatched lengths, wrong dtypes,
positions the model cannot take, ...) raises :class:`BadBatch` whose text names
the micro-batch, the field and the offending values; the trainer answers with a
negative ``BatchAck`` carrying that text and keeps running.

A bad *value* in one sample (an out-of-vocab id, a NaN advantage, a logprob
above 0, a temperature of 0) would poison the weights, but it is that sample's
fault, not the step's: the sample is dropped (its tokens become padding with no
loss) and counted, and the rest of the step trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import numpy as np

from rlbus.messages import MAX_LOGPROB, MicroBatch, TrainBatch

INTEGER_FIELDS = ("input_ids", "position_ids")
FLOAT_FIELDS = ("advantages", "inference_logprobs", "temperatures")


class BadBatch(ValueError):
    """The batch cannot be trained on; the text says why."""


@dataclass
class CheckedBatch:
    """A batch fit to train on: bad samples replaced by zero-loss padding."""

    batch: TrainBatch
    num_dropped_samples: int = 0
    reasons: list[str] = field(default_factory=list)
    """Why samples were dropped, naming micro-batch, field and values."""


def check_batch(batch: TrainBatch, rank: int, world_size: int, vocab_size: int, max_positions: int) -> CheckedBatch:
    """Raise :class:`BadBatch` if ``batch`` is not a valid share for this rank; drop bad samples."""
    if (batch.rank, batch.world_size) != (rank, world_size):
        raise BadBatch(f"batch is for rank {batch.rank} of {batch.world_size}, this is rank {rank} of {world_size}")
    if not batch.micro_batches:
        raise BadBatch("batch has no micro-batches (pad with zero-loss ones instead)")
    checked = CheckedBatch(batch)
    micro_batches, num_local = [], 0
    for index, micro in enumerate(batch.micro_batches):
        try:
            check_micro_batch(micro, max_positions)
        except BadBatch as exc:
            raise BadBatch(f"micro-batch {index}: {exc}") from None
        micro, num_dropped, reasons = drop_bad_samples(micro, vocab_size)
        checked.num_dropped_samples += num_dropped
        checked.reasons += [f"micro-batch {index}: {reason}" for reason in reasons]
        micro_batches.append(micro)
        num_local += int(np.asarray(micro.loss_mask).sum())
    if batch.num_loss_tokens < num_local:
        raise BadBatch(f"num_loss_tokens = {batch.num_loss_tokens} but this share alone has {num_local} loss tokens")
    if checked.num_dropped_samples:
        checked.batch = msgspec.structs.replace(batch, micro_batches=micro_batches)
    return checked


def check_micro_batch(micro: MicroBatch, max_positions: int) -> None:
    """Raise :class:`BadBatch` naming a problem of shape that makes the micro-batch untrainable."""
    arrays = _arrays(micro)
    lengths = {name: array.shape for name, array in arrays.items()}
    if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) != 1:
        raise BadBatch(f"arrays must be 1-D of one length, got shapes {lengths}")
    if arrays["input_ids"].size == 0:
        raise BadBatch("micro-batch is empty")
    _check_dtypes(arrays)
    positions, mask = arrays["position_ids"], arrays["loss_mask"]
    if positions.min() < 0 or positions.max() >= max_positions:
        raise BadBatch(f"position_ids range over [{positions.min()}, {positions.max()}], "
                       f"the model takes [0, {max_positions})")  # fmt: skip
    starts = _sample_starts(positions)
    if mask[starts].any():
        raise BadBatch(f"loss_mask is set on the first token of a sample (at {_show(starts[mask[starts]])}): "
                       "it has no context to be predicted from")  # fmt: skip


def drop_bad_samples(micro: MicroBatch, vocab_size: int) -> tuple[MicroBatch, int, list[str]]:
    """``micro`` with every sample holding a bad value turned into zero-loss padding; the number
    of samples dropped and why."""
    arrays = _arrays(micro)
    bad, reasons = np.zeros(arrays["input_ids"].shape, dtype=bool), []
    for name, what, offending in _bad_values(arrays, vocab_size):
        reasons.append(f"{name} {_show(arrays[name][offending])} {what}")
        bad |= offending
    if not bad.any():
        return micro, 0, []
    sample_of = np.cumsum(np.isin(np.arange(bad.size), _sample_starts(arrays["position_ids"]))) - 1
    dropped = np.isin(sample_of, np.unique(sample_of[bad]))
    num_dropped = len(np.unique(sample_of[bad]))
    fixed = {name: np.array(array) for name, array in arrays.items() if name != "position_ids"}
    fixed["input_ids"][dropped] = 0
    fixed["loss_mask"][dropped] = False
    fixed["advantages"][dropped] = 0.0
    fixed["inference_logprobs"][dropped] = 0.0
    fixed["temperatures"][dropped] = 1.0
    reasons = [f"{num_dropped} sample(s) dropped: " + "; ".join(reasons)]
    return msgspec.structs.replace(micro, **fixed), num_dropped, reasons


def _bad_values(arrays: dict[str, np.ndarray], vocab_size: int) -> list[tuple[str, str, np.ndarray]]:
    """(field, what is wrong, mask of its offending values) for each field that has any."""
    ids, mask = arrays["input_ids"], arrays["loss_mask"]
    logprobs, temperatures = arrays["inference_logprobs"], arrays["temperatures"]
    with np.errstate(invalid="ignore"):
        checks = [
            ("input_ids", f"outside the vocabulary [0, {vocab_size})", (ids < 0) | (ids >= vocab_size)),
            ("advantages", "not finite", ~np.isfinite(arrays["advantages"])),
            ("inference_logprobs", "of loss tokens not finite and <= 0",
             mask & ~(np.isfinite(logprobs) & (logprobs <= MAX_LOGPROB))),
            ("temperatures", "of loss tokens not finite and > 0", mask & ~(np.isfinite(temperatures) & (temperatures > 0))),
        ]  # fmt: skip
    return [check for check in checks if check[2].any()]


def _arrays(micro: MicroBatch) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(micro, name)) for name in (*INTEGER_FIELDS, "loss_mask", *FLOAT_FIELDS)}


def _sample_starts(positions: np.ndarray) -> np.ndarray:
    """Index of the first token of each packed sample (where positions restart)."""
    return np.flatnonzero(np.diff(positions, prepend=positions[:1] - 1) != 1)


def _check_dtypes(arrays: dict[str, np.ndarray]) -> None:
    for name in INTEGER_FIELDS:
        if arrays[name].dtype.kind not in "iu":
            raise BadBatch(f"{name} must be integers, got {arrays[name].dtype}")
    if arrays["loss_mask"].dtype != np.bool_:
        raise BadBatch(f"loss_mask must be bool, got {arrays['loss_mask'].dtype}")
    for name in FLOAT_FIELDS:
        if arrays[name].dtype.kind != "f":
            raise BadBatch(f"{name} must be floats, got {arrays[name].dtype}")


def _show(values: np.ndarray, limit: int = 5) -> str:
    """The first few offending values, and how many there are."""
    values = np.asarray(values).reshape(-1)
    head = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{head}{', ...' if values.size > limit else ''}] ({values.size} value(s))"
