"""Group advantages on hand-computed cases."""

import numpy as np
import pytest

from rlbus.services.orchestrator.advantages import group_advantages, has_signal, penalised_rewards
from rlbus.services.orchestrator.config import AdvantageConfig


def test_default_is_reward_minus_group_mean():
    advantages = group_advantages([1.0, 0.0, 0.5, 0.5], AdvantageConfig())
    np.testing.assert_allclose(advantages, [0.5, -0.5, 0.0, 0.0])


def test_leave_one_out_uses_the_mean_of_the_others():
    advantages = group_advantages([1.0, 0.0, 0.0], AdvantageConfig(leave_one_out=True))
    # rollout 0: 1 - mean(0, 0) = 1; rollout 1: 0 - mean(1, 0) = -0.5
    np.testing.assert_allclose(advantages, [1.0, -0.5, -0.5])
    assert group_advantages([0.7], AdvantageConfig(leave_one_out=True)).tolist() == [0.0]


def test_std_normalisation_divides_by_group_std():
    advantages = group_advantages([2.0, 0.0], AdvantageConfig(std_normalize=True))
    np.testing.assert_allclose(advantages, [1.0, -1.0], rtol=1e-5)


def test_equal_rewards_give_no_signal_even_with_rounding_noise():
    advantages = group_advantages([0.1 + 0.2, 0.3, 0.3], AdvantageConfig(std_normalize=True))
    assert advantages.tolist() == [0.0, 0.0, 0.0]
    assert not has_signal(advantages)
    assert has_signal(group_advantages([0.0, 1.0], AdvantageConfig()))


def test_length_penalty_makes_the_shorter_of_equal_rewards_better():
    rewards = penalised_rewards([1.0, 1.0], length_fractions=[0.25, 1.0], penalty=0.4)
    np.testing.assert_allclose(rewards, [0.9, 0.6])
    np.testing.assert_allclose(group_advantages(rewards, AdvantageConfig()), [0.15, -0.15])


def test_non_finite_rewards_are_refused():
    with pytest.raises(ValueError, match="rewards must be finite"):
        group_advantages([1.0, float("nan")], AdvantageConfig())
