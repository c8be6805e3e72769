"""Bin packing shared by the orchestrator (RL batches) and SFT (numpy only).

1. First-fit-decreasing: samples, longest first, each go into the first bin
   (micro-batch row) with room left; a bin holds at most ``capacity`` tokens.
2. Rows are dealt to ranks longest first, each to the rank with the fewest
   tokens that still has room, every rank getting ``ceil(rows / world_size)``
   rows (callers pad the short ranks with zero-loss rows, so every rank runs the
   same number of forward/backward passes and collectives never deadlock).

Both work on lengths and return indices, so callers keep their own sample types.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices per bin; no bin's lengths sum above ``capacity``."""
    if any(n > capacity or n < 0 for n in lengths):
        raise ValueError(f"lengths must be in [0, {capacity}], got {list(lengths)}")
    bins: list[list[int]] = []
    room: list[int] = []
    # Stable sort: equal lengths keep their order, so packing is deterministic.
    for index in np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist():
        length = lengths[index]
        slot = next((b for b, free in enumerate(room) if free >= length), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(index)
        room[slot] -= length
    return bins


def deal_to_ranks(row_tokens: Sequence[int], world_size: int) -> list[list[int]]:
    """Row indices per rank: at most ``ceil(rows / world_size)`` each, balanced by tokens."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    per_rank = max(1, math.ceil(len(row_tokens) / world_size))
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for row in np.argsort(-np.asarray(row_tokens, dtype=np.int64), kind="stable").tolist():
        rank = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
        ranks[rank].append(row)
        load[rank] += row_tokens[row]
    return ranks
