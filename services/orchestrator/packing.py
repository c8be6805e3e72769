"""Pack samples into micro-batches and split them across trainer ranks (numpy only).

1. First-fit-decreasing: samples, longest first, each go into the first
   micro-batch (row) with room left; a row holds at most ``seq_len`` tokens.
   Position ids restart at 0 for every sample, which is how the trainer finds
   sample boundaries (no cross-sample attention).
2. Rows are dealt to ranks longest first, each to the rank with the fewest
   tokens that still has room, every rank getting ``ceil(rows / world_size)``
   rows. Ranks short of that get zero-loss padding rows, so every rank runs
   the same number of forward/backward passes and collectives never deadlock.

A sample longer than ``seq_len`` is cut to ``seq_len`` tokens (and counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlbus.messages import MicroBatch, TrainBatch
from rlbus.packing import deal_to_ranks, first_fit_decreasing
from rlbus.services.orchestrator.rollouts import PackSample

PAD_TOKEN_ID = 0


@dataclass
class PackStats:
    num_rows: int = 0
    num_padding_rows: int = 0
    num_truncated_samples: int = 0
    num_tokens: int = 0
    num_loss_tokens: int = 0


def micro_batch(samples: Sequence[PackSample]) -> MicroBatch:
    """One row: the samples concatenated, positions restarting per sample."""
    lengths = [len(s) for s in samples]
    return MicroBatch(
        input_ids=np.concatenate([s.input_ids for s in samples]).astype(np.int32),
        position_ids=np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        loss_mask=np.concatenate([s.loss_mask for s in samples]).astype(bool),
        advantages=np.concatenate([token_advantages(s) for s in samples]),
        inference_logprobs=np.concatenate([s.inference_logprobs for s in samples]).astype(np.float32),
        temperatures=np.concatenate([np.full(n, s.temperature, np.float32) for s, n in zip(samples, lengths)]),
    )  # fmt: skip


def token_advantages(sample: PackSample) -> np.ndarray:
    """[L] float32 advantage of each token of ``sample``."""
    if sample.token_advantages is not None:
        return sample.token_advantages.astype(np.float32)
    return np.full(len(sample), sample.advantage, np.float32)


def padding_micro_batch(temperature: float = 1.0) -> MicroBatch:
    """A one-token row that carries no loss: it only keeps the ranks in step."""
    return MicroBatch(
        input_ids=np.array([PAD_TOKEN_ID], np.int32), position_ids=np.zeros(1, np.int32),
        loss_mask=np.zeros(1, bool), advantages=np.zeros(1, np.float32),
        inference_logprobs=np.zeros(1, np.float32), temperatures=np.full(1, temperature, np.float32),
    )  # fmt: skip


def truncate(sample: PackSample, seq_len: int) -> PackSample:
    return PackSample(
        input_ids=sample.input_ids[:seq_len], loss_mask=sample.loss_mask[:seq_len],
        inference_logprobs=sample.inference_logprobs[:seq_len], advantage=sample.advantage,
        temperature=sample.temperature,
        token_advantages=None if sample.token_advantages is None else sample.token_advantages[:seq_len],
    )  # fmt: skip


def pack_batch(samples: Sequence[PackSample], step: int, seq_len: int, world_size: int,
               temperature: float = 1.0) -> tuple[list[TrainBatch], PackStats]:  # fmt: skip
    """One ``TrainBatch`` per rank for ``step``, each with the same number of micro-batches."""
    stats = PackStats(num_truncated_samples=sum(len(s) > seq_len for s in samples))
    samples = [truncate(s, seq_len) if len(s) > seq_len else s for s in samples]
    rows = first_fit_decreasing([len(s) for s in samples], seq_len)
    row_tokens = [sum(len(samples[i]) for i in row) for row in rows]
    stats.num_rows, stats.num_tokens = len(rows), sum(row_tokens)
    stats.num_loss_tokens = sum(s.num_loss_tokens for s in samples)
    per_rank = deal_to_ranks(row_tokens, world_size)
    # An empty batch still gives every rank one (padding) row: the trainer steps in lockstep.
    num_rows_per_rank = max(1, max(len(r) for r in per_rank))
    batches = []
    for rank, row_indices in enumerate(per_rank):
        micro_batches = [micro_batch([samples[i] for i in rows[r]]) for r in row_indices]
        num_padding = num_rows_per_rank - len(micro_batches)
        micro_batches += [padding_micro_batch(temperature) for _ in range(num_padding)]
        stats.num_padding_rows += num_padding
        batches.append(TrainBatch(step=step, rank=rank, world_size=world_size, micro_batches=micro_batches,
                                  num_loss_tokens=stats.num_loss_tokens))  # fmt: skip
    return batches, stats
