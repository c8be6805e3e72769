"""Evaluation at the current policy: eval tasks, their results, avg@k and pass@k.

Each evaluation environment rolls out its first ``num_examples`` examples
``k = rollouts_per_example`` times. Per environment:

- ``avg@k``: the mean reward over all k rollouts of all examples.
- ``pass@k``: the fraction of examples solved by at least one of k rollouts,
  where a rollout is solved when its reward is at least ``pass_threshold``.
  Computed with the unbiased estimator of Chen et al. (2021), which for
  n = k samples per example is exactly "any of them solved it".

Eval results never enter training; they are reported as
``eval/<env>/avg@<k>`` and ``eval/<env>/pass@<k>`` at the evaluated policy step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rlbus.messages import RolloutResult
from rlbus.services.orchestrator.config import EvalConfig, EvalEnvSpec


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={num_samples} c={num_correct} k={k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def env_metrics(env_id: str, rewards: Sequence[Sequence[float]], k: int, threshold: float) -> dict[str, float]:
    """avg@k and pass@k of one environment from [examples][rollouts] rewards."""
    if not rewards:
        return {}
    per_example = [np.asarray(r, dtype=np.float64) for r in rewards]
    passes = [pass_at_k(len(r), int(np.sum(r >= threshold)), min(k, len(r))) for r in per_example]
    return {
        f"eval/{env_id}/avg@{k}": float(np.mean(np.concatenate(per_example))),
        f"eval/{env_id}/pass@{k}": float(np.mean(passes)),
        f"eval/{env_id}/num_examples": float(len(per_example)),
    }


@dataclass
class EvalRound:
    """One evaluation of one policy step, from its tasks to its metrics."""

    policy_step: int
    specs: list[EvalEnvSpec]
    threshold: float
    pending: dict[str, int] = field(default_factory=dict)
    """Open task id -> index of its environment in ``specs``."""
    rewards: list[list[list[float]]] = field(default_factory=list)
    """Per environment, per finished example: rollout rewards."""
    num_errored: list[int] = field(default_factory=list)
    num_abandoned: list[int] = field(default_factory=list)
    """Per environment, examples given up without a result (not in avg@k or pass@k)."""

    def __post_init__(self) -> None:
        self.rewards = [[] for _ in self.specs]
        self.num_errored = [0] * len(self.specs)
        self.num_abandoned = [0] * len(self.specs)

    def abandon(self, task_id: str) -> bool:
        """Close ``task_id`` without a result if it belongs to this round; True if it did."""
        env_index = self.pending.pop(task_id, None)
        if env_index is None:
            return False
        self.num_abandoned[env_index] += 1
        return True

    def record(self, result: RolloutResult) -> bool:
        """Store ``result`` if it belongs to this round; True if it did."""
        env_index = self.pending.pop(result.task_id, None)
        if env_index is None:
            return False
        # A failed rollout (error, non-finite reward, none at all) counts as reward 0.
        rewards = [r.reward if math.isfinite(r.reward) else 0.0 for r in result.rollouts] or [0.0]
        self.rewards[env_index].append(rewards)
        self.num_errored[env_index] += sum(r.error is not None for r in result.rollouts) + (not result.rollouts)
        return True

    @property
    def done(self) -> bool:
        return not self.pending

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for index, spec in enumerate(self.specs):
            name = spec.metric_name
            metrics |= env_metrics(name, self.rewards[index], spec.rollouts_per_example, self.threshold)
            metrics[f"eval/{name}/errored_rollouts"] = float(self.num_errored[index])
            metrics[f"eval/{name}/abandoned_tasks"] = float(self.num_abandoned[index])
        return metrics


@dataclass
class EvalScheduler:
    """Starts an :class:`EvalRound` for each policy step that is a multiple of ``interval``, and for
    ``final_step`` (the run's last policy: what it ends with is always measured)."""

    config: EvalConfig
    env_sizes: list[int]
    """Examples available in each eval environment (``config.env`` order)."""
    final_step: int | None = None
    """The run's ``max_steps``; None when it has none."""
    rounds: list[EvalRound] = field(default_factory=list)
    evaluated: set[int] = field(default_factory=set)

    @property
    def final_pending(self) -> bool:
        """The last policy is still to be evaluated (the run must not end before it is)."""
        return self._enabled and self.final_step is not None and self.final_step not in self.evaluated

    def skip_final(self) -> None:
        """Give up evaluating the last policy (inference never served it)."""
        if self.final_step is not None:
            self.evaluated.add(self.final_step)

    @property
    def _enabled(self) -> bool:
        return self.config.interval is not None and bool(self.config.env)

    def due(self, policy_step: int) -> bool:
        interval = self.config.interval
        if not self._enabled or policy_step in self.evaluated:
            return False
        return policy_step % interval == 0 or policy_step == self.final_step

    def start(self, policy_step: int, new_task_id: Callable[[], str]) -> list[tuple[str, EvalEnvSpec, int]]:
        """Open a round for ``policy_step``; returns (task id, env spec, example id) to issue."""
        self.evaluated.add(policy_step)
        round_ = EvalRound(policy_step, list(self.config.env), self.config.pass_threshold)
        tasks = []
        for env_index, (spec, size) in enumerate(zip(self.config.env, self.env_sizes)):
            for example_id in range(min(spec.num_examples, size)):
                task_id = new_task_id()
                round_.pending[task_id] = env_index
                tasks.append((task_id, spec, example_id))
        self.rounds.append(round_)
        return tasks

    def record(self, result: RolloutResult) -> EvalRound | None:
        """Store an eval result; returns its round once that round is complete (and forgets it)."""
        return self._close(lambda round_: round_.record(result))

    def abandon(self, task_id: str) -> EvalRound | None:
        """Close an eval task given up without a result; returns its round once complete."""
        return self._close(lambda round_: round_.abandon(task_id))

    def _close(self, closes: Callable[[EvalRound], bool]) -> EvalRound | None:
        for round_ in self.rounds:
            if closes(round_):
                if round_.done:
                    self.rounds.remove(round_)
                    return round_
                return None
        return None

    def owns(self, task_id: str) -> bool:
        return any(task_id in round_.pending for round_ in self.rounds)
