"""Task sampling: deterministic from the seed, by ratio, resumable from its state."""

from collections import Counter

import msgspec
import pytest

from rlbus.services.orchestrator.sampler import SamplerState, TaskSampler


def test_same_seed_same_sequence_other_seed_differs():
    first = TaskSampler([50, 30], [1.0, 2.0], seed=7).draws(200)
    again = TaskSampler([50, 30], [1.0, 2.0], seed=7).draws(200)
    other = TaskSampler([50, 30], [1.0, 2.0], seed=8).draws(200)
    assert first == again
    assert first != other


def test_environments_are_drawn_by_ratio():
    draws = TaskSampler([10, 10, 10], [1.0, 2.0, 7.0], seed=0).draws(10_000)
    shares = Counter(d.env_index for d in draws)
    assert abs(shares[0] / 10_000 - 0.1) < 0.02
    assert abs(shares[1] / 10_000 - 0.2) < 0.02
    assert abs(shares[2] / 10_000 - 0.7) < 0.02


def test_each_epoch_visits_every_example_once_in_a_new_order():
    draws = [d.example_id for d in TaskSampler([25], [1.0], seed=3).draws(75)]
    epochs = [draws[0:25], draws[25:50], draws[50:75]]
    assert all(sorted(epoch) == list(range(25)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_resumed_sampler_continues_the_same_sequence():
    full = TaskSampler([7, 13], [1.0, 1.0], seed=11).draws(100)
    sampler = TaskSampler([7, 13], [1.0, 1.0], seed=11)
    head = sampler.draws(37)
    saved = msgspec.json.encode(sampler.snapshot())  # as it goes through the checkpoint
    resumed = TaskSampler([7, 13], [1.0, 1.0], seed=11, state=msgspec.json.decode(saved, type=SamplerState))
    assert head + resumed.draws(63) == full


def test_snapshot_is_a_copy():
    sampler = TaskSampler([5], [1.0], seed=0)
    snapshot = sampler.snapshot()
    sampler.draws(3)
    assert (snapshot.num_draws, snapshot.positions) == (0, [0])


def test_bad_inputs_name_the_values():
    with pytest.raises(ValueError, match=r"sizes are \[4, 0\]"):
        TaskSampler([4, 0], [1.0, 1.0], seed=0)
    with pytest.raises(ValueError, match=r"ratios must be positive, got \[1.0, 0.0\]"):
        TaskSampler([4, 4], [1.0, 0.0], seed=0)
    with pytest.raises(ValueError, match="state is for 1 environments, the config has 2"):
        TaskSampler([4, 4], [1.0, 1.0], seed=0, state=SamplerState(epochs=[0], positions=[0]))


def test_negative_seed_is_accepted_and_deterministic():
    assert TaskSampler([9], [1.0], seed=-5).draws(9) == TaskSampler([9], [1.0], seed=-5).draws(9)
