"""Training batches made up for tests: packed samples with prompt and completion parts."""

from __future__ import annotations

import numpy as np

from rlbus.messages import MicroBatch, TrainBatch


def micro_batch(rng: np.random.Generator, lengths=((5, 9), (4, 7)), vocab: int = 256) -> MicroBatch:
    """Samples of (prompt, completion) tokens packed in one row; loss on completions."""
    ids, positions, mask, advantages, logprobs = [], [], [], [], []
    for prompt, completion in lengths:
        n = prompt + completion
        ids.append(rng.integers(0, vocab, n))
        positions.append(np.arange(n))
        mask.append(np.arange(n) >= prompt)
        advantages.append(np.full(n, rng.choice([-1.0, -0.5, 0.5, 1.0])))
        logprobs.append(np.where(np.arange(n) >= prompt, -rng.uniform(0.1, 7.0, n), 0.0))
    return MicroBatch(
        input_ids=np.concatenate(ids).astype(np.int32),
        position_ids=np.concatenate(positions).astype(np.int32),
        loss_mask=np.concatenate(mask),
        advantages=np.concatenate(advantages).astype(np.float32),
        inference_logprobs=np.concatenate(logprobs).astype(np.float32),
        temperatures=np.ones(sum(p + c for p, c in lengths), np.float32),
    )


def step_micro_batches(step: int, num_micro_batches: int = 4, seed: int = 0) -> list[MicroBatch]:
    """The same micro-batches for the same (seed, step), whoever asks."""
    rng = np.random.default_rng([seed, step])
    return [micro_batch(rng) for _ in range(num_micro_batches)]


def train_batch(step: int, rank: int = 0, world_size: int = 1, num_micro_batches: int = 4, seed: int = 0) -> TrainBatch:
    """Rank ``rank``'s share (micro-batches rank, rank + world_size, ...) of step ``step``."""
    micro = step_micro_batches(step, num_micro_batches, seed)
    total = sum(int(m.loss_mask.sum()) for m in micro)
    return TrainBatch(step=step, rank=rank, world_size=world_size, micro_batches=micro[rank::world_size],
                      num_loss_tokens=total)  # fmt: skip
