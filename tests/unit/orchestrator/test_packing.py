"""Packing invariants (hypothesis): no token lost or duplicated, positions per sample,
rows within seq_len, the same number of micro-batches on every rank."""

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rlbus.services.orchestrator.packing import pack_batch
from rlbus.services.orchestrator.rollouts import PackSample

SETTINGS = settings(max_examples=150, deadline=None)


def make_sample(sample_id: int, length: int, num_loss: int) -> PackSample:
    # Token ids encode (sample, position) so every token can be traced after packing.
    ids = np.arange(length, dtype=np.int32) + sample_id * 10_000
    mask = np.zeros(length, bool)
    mask[length - num_loss:] = True
    logprobs = np.where(mask, -0.5 - sample_id, 0).astype(np.float32)
    return PackSample(input_ids=ids, loss_mask=mask, inference_logprobs=logprobs, advantage=float(sample_id) - 3,
                      temperature=0.7)


@st.composite
def sample_sets(draw):
    seq_len = draw(st.integers(16, 96))
    lengths = draw(st.lists(st.integers(1, seq_len), max_size=40))
    samples = [make_sample(i, n, draw(st.integers(0, n))) for i, n in enumerate(lengths)]
    return samples, seq_len, draw(st.integers(1, 5))


def unpack(micro_batch):
    """(sample id, position) of every token, checking positions restart at each sample."""
    tokens, ids, positions = [], micro_batch.input_ids, micro_batch.position_ids
    starts = np.flatnonzero(positions == 0).tolist() + [len(ids)]
    assert starts[0] == 0
    for start, end in itertools.pairwise(starts):
        sample_id = int(ids[start]) // 10_000
        assert positions[start:end].tolist() == list(range(end - start))
        assert (ids[start:end] - sample_id * 10_000).tolist() == list(range(end - start))
        assert np.all(micro_batch.advantages[start:end] == np.float32(sample_id - 3))
        tokens += [(sample_id, p) for p in range(end - start)]
    return tokens


@SETTINGS
@given(sample_sets())
def test_packing_keeps_every_token_once_in_rows_of_at_most_seq_len(case):
    samples, seq_len, world_size = case
    batches, stats = pack_batch(samples, step=4, seq_len=seq_len, world_size=world_size, temperature=0.7)
    assert [b.rank for b in batches] == list(range(world_size))
    assert len({len(b.micro_batches) for b in batches}) == 1, "every rank needs the same number of micro-batches"
    packed, num_padding = [], 0
    for batch in batches:
        assert batch.step == 4 and batch.world_size == world_size
        for mb in batch.micro_batches:
            lengths = {len(mb.input_ids), len(mb.position_ids), len(mb.loss_mask), len(mb.advantages),
                       len(mb.inference_logprobs), len(mb.temperatures)}
            assert len(lengths) == 1 and 1 <= len(mb.input_ids) <= seq_len
            assert mb.input_ids.dtype == np.int32 and mb.loss_mask.dtype == bool
            assert np.all(mb.temperatures == np.float32(0.7))
            assert np.all(mb.inference_logprobs[~mb.loss_mask] == 0)
            if _is_padding(mb):
                num_padding += 1
            else:
                packed += unpack(mb)
    expected = [(i, p) for i, s in enumerate(samples) for p in range(len(s))]
    assert sorted(packed) == sorted(expected)
    num_loss = sum(int(s.loss_mask.sum()) for s in samples)
    assert all(b.num_loss_tokens == num_loss for b in batches)
    assert sum(int(mb.loss_mask.sum()) for b in batches for mb in b.micro_batches) == num_loss
    assert stats.num_tokens == sum(len(s) for s in samples)
    assert num_padding == stats.num_padding_rows


def _is_padding(mb) -> bool:
    return len(mb.input_ids) == 1 and not mb.loss_mask.any() and mb.advantages[0] == 0 and mb.input_ids[0] == 0


def test_empty_batch_gives_every_rank_one_zero_loss_row():
    batches, stats = pack_batch([], step=0, seq_len=32, world_size=3)
    assert [len(b.micro_batches) for b in batches] == [1, 1, 1]
    assert all(b.num_loss_tokens == 0 and not b.micro_batches[0].loss_mask.any() for b in batches)
    assert stats.num_padding_rows == 3


def test_overlong_sample_is_cut_to_seq_len_and_counted():
    batches, stats = pack_batch([make_sample(0, 40, 30)], step=0, seq_len=32, world_size=1)
    (mb,) = batches[0].micro_batches
    assert len(mb.input_ids) == 32 and stats.num_truncated_samples == 1
    assert batches[0].num_loss_tokens == 22
