"""The run's rollout tasks: ids unique across restarts, reproducible sampling seeds.

:class:`TaskFactory` only builds tasks; the orchestrator's core decides when to issue them
and the ledger leases them out.
"""

from __future__ import annotations

import os

import msgspec

from rlbus.messages import RolloutTask, SamplingParams
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.leases import TaskLedger
from rlbus.services.orchestrator.sampler import sampling_seed
from rlbus.teacher import TrainingMode


class TaskFactory:
    """Builds training and eval tasks for one orchestrator process."""

    def __init__(self, config: OrchestratorConfig, ledger: TaskLedger) -> None:
        self.config = config
        self.ledger = ledger
        self.sampling = SamplingParams(temperature=config.sampling.temperature, top_p=config.sampling.top_p,
                                       max_tokens=config.sampling.max_tokens)  # fmt: skip
        # Task ids must never repeat across restarts: workers may still hold old ones.
        self.run_id = os.urandom(4).hex()
        self._num_tasks = 0
        self._seed_slot = (0, -1)
        """(batch step, slot) of the latest training task's sampling seed (:meth:`_next_sampling_seed`)."""

    def training(self, env_index: int, example_id: int, step: int) -> RolloutTask:
        """A group of ``rollouts_per_example`` for batch ``step``, sampled with its own seed."""
        config = self.config
        spec = config.train.env[env_index]
        return self._task(spec.id, spec.loader_args, example_id, config.rollouts_per_example, is_eval=False,
                          min_policy_step=max(0, step - 1 - config.max_async_level),
                          seed=self._next_sampling_seed(step), training_mode=config.training_mode)  # fmt: skip

    def evaluation(self, env_id: str, env_args: dict, example_id: int, num_rollouts: int, policy_step: int,
                   task_id: str, temperature: float | None) -> RolloutTask:  # fmt: skip
        """An eval task of ``policy_step`` (ids come from :meth:`new_task_id`, planned by the eval round)."""
        return self._task(env_id, env_args, example_id, num_rollouts, is_eval=True, min_policy_step=policy_step,
                          task_id=task_id, temperature=temperature)  # fmt: skip

    def new_task_id(self) -> str:
        # An id a result already named (a forged or confused peer) is skipped: reusing it would
        # make the new task a duplicate of that result, or fail to enter the ledger at all.
        self._num_tasks += 1
        while self.ledger.uses(f"{self.run_id}-{self._num_tasks}"):
            self._num_tasks += 1
        return f"{self.run_id}-{self._num_tasks}"

    def _task(self, env_id: str, env_args: dict, example_id: int, num_rollouts: int, is_eval: bool,
              min_policy_step: int, task_id: str | None = None, seed: int | None = None,
              temperature: float | None = None, training_mode: TrainingMode = "rl") -> RolloutTask:  # fmt: skip
        sampling = self.sampling if seed is None else msgspec.structs.replace(self.sampling, seed=seed)
        if temperature is not None:
            sampling = msgspec.structs.replace(sampling, temperature=temperature)
        return RolloutTask(
            task_id=task_id or self.new_task_id(), env_id=env_id, env_args=dict(env_args), example_id=example_id,
            num_rollouts=num_rollouts, sampling=sampling, is_eval=is_eval, lease_s=self.config.task_lease_s,
            issued_at=0.0, min_policy_step=min_policy_step, training_mode=training_mode,
        )  # fmt: skip

    def _next_sampling_seed(self, step: int) -> int:
        """The seed of the next training task issued for batch ``step``. Not from the task id (it is
        random per process) nor from arrival order: at ``max_async_level`` 0 the same seed gives the
        same seeds to the same examples, hence the same rollouts."""
        last_step, slot = self._seed_slot
        slot = slot + 1 if last_step == step else 0
        self._seed_slot = (step, slot)
        return sampling_seed(self.config.seed, step, slot)
