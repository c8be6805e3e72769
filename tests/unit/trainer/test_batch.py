"""Bad batches are refused with a reason naming the problem."""

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
    ("input_ids", lambda a: np.where(np.arange(a.size) == 3, 999, a).astype(np.int32),
     r"input_ids \[999\] \(1 value\(s\)\) are outside the vocabulary \[0, 320\)"),
    ("input_ids", lambda a: a.astype(np.float32), "input_ids must be integers, got float32"),
    ("advantages", lambda a: np.where(np.arange(a.size) == 2, np.nan, a).astype(np.float32),
     r"advantages hold non-finite values \[nan\]"),
    ("inference_logprobs", lambda a: np.where(np.arange(a.size) == 8, 0.7, a).astype(np.float32),
     "inference_logprobs of loss tokens must be finite and <= 0"),
    ("temperatures", lambda a: np.zeros_like(a), "temperatures of loss tokens must be finite and > 0"),
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
