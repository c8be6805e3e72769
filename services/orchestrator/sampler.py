"""Which example to roll out next: environments by ratio, examples in seeded epochs.

Every choice is a pure function of the seed and a counter, so the sampler's
whole state is a few integers (:class:`SamplerState`). The state goes into
the progress checkpoint and a resumed run continues the same sequence.

- Environment of draw ``i``: a weighted choice by ``ratio`` from a generator
  seeded with ``(seed, i)``.
- Example within an environment: walk a permutation of its examples seeded
  with ``(seed, env_index, epoch)``; a new epoch reshuffles.
- Sampling seed of a training task (:func:`sampling_seed`): from ``(seed,
  step, slot)``, the slot counting the tasks issued for that batch step; the
  env-worker offsets it per rollout and turn, and vLLM gives each seeded
  request its own random generator, so what a request samples does not depend
  on which other requests shared its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec
import numpy as np
from loguru import logger

# Distinguish the environment stream and the sampling seeds from the per-environment permutations.
_ENV_STREAM = 0x5EED
_SAMPLING_STREAM = 0x5A3B


class Environment(Protocol):
    """What the orchestrator needs of an environment (``rlbus.environments.registry``)."""

    num_examples: int

    def example(self, index: int) -> dict: ...


class SamplerState(msgspec.Struct, kw_only=True):
    """Position of a :class:`TaskSampler`: enough to continue its sequence exactly."""

    num_draws: int = 0
    epochs: list[int] = []
    """Per environment: how many full passes over its examples are done."""
    positions: list[int] = []
    """Per environment: examples drawn in the current epoch."""


class Draw(msgspec.Struct, frozen=True):
    """One sampled example: index into the training environments and example id."""

    env_index: int
    example_id: int


class TaskSampler:
    """Deterministic draws of (environment, example) from the seed."""

    def __init__(self, num_examples: Sequence[int], ratios: Sequence[float], seed: int,
                 state: SamplerState | None = None) -> None:  # fmt: skip
        if len(num_examples) != len(ratios) or not num_examples:
            raise ValueError(f"need one ratio per environment, got sizes {list(num_examples)} ratios {list(ratios)}")
        if any(n < 1 for n in num_examples):
            raise ValueError(f"every training environment needs examples; sizes are {list(num_examples)}")
        if any(not r > 0 for r in ratios):
            raise ValueError(f"ratios must be positive, got {list(ratios)}")
        self.num_examples = [int(n) for n in num_examples]
        self.cumulative = np.cumsum(np.asarray(ratios, dtype=np.float64))
        self.seed = seed % 2**64  # numpy seeds must be non-negative
        self.state = state or SamplerState(epochs=[0] * len(num_examples), positions=[0] * len(num_examples))
        if len(self.state.epochs) != len(num_examples) or len(self.state.positions) != len(num_examples):
            raise ValueError(
                f"sampler state is for {len(self.state.epochs)} environments, the config has {len(num_examples)}"
            )
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    def draw(self) -> Draw:
        env_index = self._choose_env(self.state.num_draws)
        self.state.num_draws += 1
        return Draw(env_index, self._next_example(env_index))

    def draws(self, count: int) -> list[Draw]:
        return [self.draw() for _ in range(count)]

    def snapshot(self) -> SamplerState:
        """A copy of the position, safe to keep while drawing goes on."""
        return msgspec.structs.replace(self.state, epochs=list(self.state.epochs),
                                       positions=list(self.state.positions))  # fmt: skip

    def _choose_env(self, draw_index: int) -> int:
        if len(self.cumulative) == 1:
            return 0
        point = np.random.default_rng([self.seed, _ENV_STREAM, draw_index]).random() * self.cumulative[-1]
        return int(np.searchsorted(self.cumulative, point, side="right"))

    def _next_example(self, env_index: int) -> int:
        epoch, position = self.state.epochs[env_index], self.state.positions[env_index]
        example_id = int(self._permutation(env_index, epoch)[position])
        if position + 1 == self.num_examples[env_index]:
            self.state.epochs[env_index], self.state.positions[env_index] = epoch + 1, 0
        else:
            self.state.positions[env_index] = position + 1
        return example_id

    def _permutation(self, env_index: int, epoch: int) -> np.ndarray:
        cached = self._permutations.get(env_index)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, env_index, epoch])
            cached = (epoch, rng.permutation(self.num_examples[env_index]))
            self._permutations[env_index] = cached
        return cached[1]


def existing_draws(draws: Sequence[Draw], num_examples: Sequence[int]) -> list[Draw]:
    """The ``draws`` (e.g. pending ones of a checkpoint) that name an example the environments still have."""
    valid = [d for d in draws if d.env_index < len(num_examples) and d.example_id < num_examples[d.env_index]]
    if len(valid) < len(draws):
        logger.warning("dropped {} drawn examples that the training environments no longer have",
                       len(draws) - len(valid))  # fmt: skip
    return valid


def sampling_seed(seed: int, step: int, slot: int) -> int:
    """The vLLM seed of the ``slot``-th training task issued for batch ``step`` of a run seeded ``seed``.

    Below 2**62: the env-worker adds small per-rollout offsets and vLLM takes a signed 64-bit seed.
    """
    entropy = [seed % 2**64, _SAMPLING_STREAM, step, slot]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 2
