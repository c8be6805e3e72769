"""Small fakes of the orchestrator's peers, shared by its unit and integration tests.

Completion token ids encode the policy step that sampled them (``POLICY_TOKEN + step``),
so a test can read, from a packed batch alone, how stale every trained token is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlbus.messages import Rollout, RolloutResult, RolloutTask, TrainBatch, Turn

POLICY_TOKEN = 1000
PROMPT = [1, 2, 3, 4]


@dataclass
class StubEnvironment:
    """The environment contract (``num_examples``, ``example``) with nothing behind it."""

    num_examples: int

    def example(self, index: int) -> dict:
        return {"index": index}


def stub_loader(sizes: dict[str, int]):
    return lambda env_id, args: StubEnvironment(sizes[env_id])


def roll_out(task: RolloutTask, policy_step: int, worker_id: str = "fake-worker",
             rewards: list[float] | None = None, completion_len: int = 3) -> RolloutResult:
    """A scored group for ``task``; rewards alternate 0/1 by default so the group has signal."""
    rewards = rewards if rewards is not None else [float(i % 2) for i in range(task.num_rollouts)]
    rollouts = []
    for i, reward in enumerate(rewards):
        completion = [POLICY_TOKEN + policy_step] * completion_len
        turn = Turn(prompt_ids=PROMPT, completion_ids=completion, completion_logprobs=[-0.5] * completion_len,
                    completion_mask=[True] * completion_len, policy_step=policy_step)
        rollouts.append(Rollout(rollout_id=f"{task.task_id}/{i}", turns=[turn], reward=reward,
                                prompt_text=f"example {task.example_id}", completion_text="..."))
    return RolloutResult(task_id=task.task_id, worker_id=worker_id, env_id=task.env_id, example_id=task.example_id,
                         is_eval=task.is_eval, rollouts=rollouts)


def trained_policy_steps(batch: TrainBatch) -> list[int]:
    """Policy step of every loss token in ``batch``."""
    steps: list[int] = []
    for mb in batch.micro_batches:
        steps += (np.asarray(mb.input_ids)[np.asarray(mb.loss_mask)] - POLICY_TOKEN).tolist()
    return steps
