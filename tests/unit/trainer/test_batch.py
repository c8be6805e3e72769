"""Bad batches are refused with a reason naming the problem; a sample with bad values is dropped
and the rest of the step trains."""

import numpy as np
import pytest

from rlbus.services.trainer.batch import BadBatch, check_batch
from tests.unit.trainer.batches import train_batch


def check(batch, rank=0, world_size=1):
    check_batch(batch, rank, world_size, vocab_size=320, max_positions=512)


def with_field(name, update):
    batch = train_batch(1)
    micro = batch.micro_batches[1]
    array = np.array(getattr(micro, name))
    setattr(micro, name, update(array))
    return batch


def test_good_batch_passes():
    check(train_batch(1))
    check(train_batch(1, rank=1, world_size=2), rank=1, world_size=2)


@pytest.mark.parametrize(("name", "update", "reason"), [
    ("advantages", lambda a: np.append(a, 1.0).astype(np.float32), "arrays must be 1-D of one length"),
    ("input_ids", lambda a: a.astype(np.float32), "input_ids must be integers, got float32"),
    ("position_ids", lambda a: (a + 600).astype(np.int32), r"position_ids range over \[600, 613\]"),
    ("loss_mask", lambda a: np.ones_like(a), "loss_mask is set on the first token of a sample"),
    ("loss_mask", lambda a: a.astype(np.int8), "loss_mask must be bool"),
])  # fmt: skip
def test_bad_micro_batch_is_named(name, update, reason):
    with pytest.raises(BadBatch, match=f"micro-batch 1: {reason}"):
        check(with_field(name, update))


def test_batch_level_problems():
    batch = train_batch(1)
    with pytest.raises(BadBatch, match="batch is for rank 0 of 1, this is rank 1 of 2"):
        check(batch, rank=1, world_size=2)
    batch.num_loss_tokens = 3
    with pytest.raises(BadBatch, match="num_loss_tokens = 3 but this share alone has 64 loss tokens"):
        check(batch)
    batch.micro_batches = []
    with pytest.raises(BadBatch, match="no micro-batches"):
        check(batch)


@pytest.mark.parametrize(("name", "index", "value", "reason"), [
    ("input_ids", 3, 999, r"input_ids [999] (1 value(s)) outside the vocabulary [0, 320)"),
    ("advantages", 2, np.nan, "advantages [nan] (1 value(s)) not finite"),
    ("advantages", 2, 1e39, "advantages [inf] (1 value(s)) not finite"),  # a huge reward, once float32
    ("inference_logprobs", 8, 0.5, "inference_logprobs [0.5] (1 value(s)) of loss tokens not finite and <= 0"),
    ("temperatures", 8, 0.0, "temperatures [0.0] (1 value(s)) of loss tokens not finite and > 0"),
])  # fmt: skip
def test_a_sample_with_a_bad_value_is_dropped_and_the_rest_of_the_step_kept(name, index, value, reason):
    batch = train_batch(1)
    micro = batch.micro_batches[1]
    array = np.array(getattr(micro, name))
    with np.errstate(over="ignore"):
        array[index] = value
    setattr(micro, name, array)
    positions = np.asarray(micro.position_ids)
    starts = list(np.flatnonzero(positions == 0)) + [positions.size]
    sample = next(i for i in range(len(starts) - 1) if starts[i] <= index < starts[i + 1])
    span = slice(starts[sample], starts[sample + 1])
    kept_before = np.asarray(micro.loss_mask).copy()
    checked = check_batch(batch, 0, 1, vocab_size=320, max_positions=512)
    assert checked.num_dropped_samples == 1 and reason in checked.reasons[0] and "micro-batch 1" in checked.reasons[0]
    fixed = checked.batch.micro_batches[1]
    assert not np.asarray(fixed.loss_mask)[span].any() and (np.asarray(fixed.input_ids)[span] == 0).all()
    outside = np.ones(positions.size, bool)
    outside[span] = False
    assert (np.asarray(fixed.loss_mask)[outside] == kept_before[outside]).all() and kept_before[outside].any()
    assert checked.batch.micro_batches[0] is batch.micro_batches[0]  # untouched micro-batches are not copied
    for field in ("advantages", "inference_logprobs", "temperatures"):
        assert np.isfinite(np.asarray(getattr(fixed, field))).all()
