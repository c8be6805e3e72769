"""The bin packing shared by RL batches and SFT (hypothesis): every index once, bins within capacity,
rows dealt evenly and balanced by tokens."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlbus.packing import deal_to_ranks, first_fit_decreasing

SETTINGS = settings(max_examples=150, deadline=None)


@SETTINGS
@given(st.lists(st.integers(0, 50), max_size=60), st.integers(50, 120))
def test_first_fit_decreasing_respects_capacity_and_uses_each_index_once(lengths, capacity):
    bins = first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # First fit never opens a bin while an earlier one has room, so at most one bin is half full or less.
    assert sum(sum(lengths[i] for i in b) <= capacity // 2 for b in bins) <= 1


@SETTINGS
@given(st.lists(st.integers(1, 100), max_size=40), st.integers(1, 6))
def test_rows_are_dealt_evenly_and_balanced_by_tokens(row_tokens, world_size):
    ranks = deal_to_ranks(row_tokens, world_size)
    assert sorted(r for rank in ranks for r in rank) == list(range(len(row_tokens)))
    per_rank = max(1, -(-len(row_tokens) // world_size))
    assert all(len(rank) <= per_rank for rank in ranks)
    loads = [sum(row_tokens[r] for r in rank) for rank in ranks]
    if len(row_tokens) >= world_size:
        assert max(loads) - min(loads) <= max(row_tokens)


def test_hand_case_first_fit_decreasing():
    # Longest first: 9 opens row 0, 6 opens row 1, 5 fits neither (1 and 4 left), 3 joins 6, 2 joins 5.
    assert first_fit_decreasing([5, 9, 3, 6, 2], capacity=10) == [[1], [3, 2], [0, 4]]
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 10\]"):
        first_fit_decreasing([11], capacity=10)
