"""Per-group advantages: how much better each rollout did than its siblings.

Default (Dr. GRPO style): ``A_i = r_i - mean(r)`` over the rollouts of one
example, no std normalisation. Options:

- ``leave_one_out`` (RLOO): the baseline of rollout i is the mean of the
  *other* rollouts, ``A_i = n/(n-1) * (r_i - mean(r))``; a group of one has 0.
- ``std_normalize``: divide by the group's reward standard deviation (GRPO).
- ``length_penalty``: subtract ``penalty * length_fraction`` from each
  reward first, where the fraction is completion tokens over the tokens the
  rollout could have used.

A group whose advantages are all zero (every rollout scored the same) gives
the loss no signal; :func:`has_signal` lets the caller drop and count it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlbus.services.orchestrator.config import AdvantageConfig

# Rewards are floats from arbitrary scorers: anything this close to the
# baseline is treated as equal, so round-off does not turn into "signal".
ZERO_ADVANTAGE = 1e-8
STD_EPS = 1e-6


def penalised_rewards(rewards: Sequence[float], length_fractions: Sequence[float], penalty: float) -> np.ndarray:
    """[n] rewards minus ``penalty * length_fraction`` (unchanged when ``penalty`` is 0)."""
    rewards_arr = np.asarray(rewards, dtype=np.float64)
    if penalty == 0:
        return rewards_arr
    return rewards_arr - penalty * np.asarray(length_fractions, dtype=np.float64)


def group_advantages(rewards: Sequence[float], config: AdvantageConfig) -> np.ndarray:
    """[n] advantage of each rollout of one group, from its [n] (penalised) rewards."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"a group needs a 1-d list of rewards, got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"rewards must be finite, got {r.tolist()}")
    n = r.size
    centred = r - r.mean()
    if config.leave_one_out:
        centred = centred * (n / (n - 1)) if n > 1 else np.zeros_like(r)
    if config.std_normalize:
        centred = centred / (r.std() + STD_EPS)
    centred[np.abs(centred) < ZERO_ADVANTAGE] = 0.0
    return centred


def has_signal(advantages: np.ndarray) -> bool:
    """False when every advantage of the group is zero (nothing to learn from it)."""
    return bool(np.any(advantages != 0.0))
