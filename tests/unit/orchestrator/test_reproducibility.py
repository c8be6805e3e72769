"""Same seed, same run: training tasks carry seeds from (seed, step, slot), batches ignore arrival order."""

from itertools import chain

import numpy as np

from rlbus.messages import BatchRequest
from rlbus.services.orchestrator.sampler import sampling_seed

from .fakes import roll_out
from .test_core import load_policy, make_config, make_core, request_tasks


def issued_seeds(tmp_path, seed: int, steps: int = 2) -> list[list[int]]:
    """The sampling seed of every training task issued for each of the first ``steps`` steps (async level 0)."""
    core = make_core(make_config(tmp_path / str(seed), seed=seed, max_async_level=0))
    per_step = []
    for step in range(1, steps + 1):
        tasks = request_tasks(core)
        per_step.append([task.sampling.seed for task in tasks])
        for task in tasks:
            assert core.on_result(roll_out(task, policy_step=step - 1)).accepted
        core.tick()
        load_policy(core, step)
    return per_step


def test_training_tasks_are_seeded_by_run_seed_step_and_slot(tmp_path):
    seeds = issued_seeds(tmp_path, seed=5)
    assert seeds == [[sampling_seed(5, step, slot) for slot in range(2)] for step in (1, 2)]
    assert issued_seeds(tmp_path / "again", seed=5) == seeds  # task ids differ (random per process), seeds do not
    flat, other = list(chain(*seeds)), list(chain(*issued_seeds(tmp_path, seed=6)))
    assert len(set(flat)) == 4 and not set(flat) & set(other)
    # Room for the env-worker's per-rollout and per-turn offsets below vLLM's signed 64-bit limit.
    assert all(0 <= s < 2**62 for s in flat + other)


def test_a_reissued_task_keeps_its_seed_and_a_replacement_gets_the_next_slot(tmp_path):
    core = make_core(make_config(tmp_path, seed=3, task_lease_s=10))
    first = request_tasks(core, identity=b"dead")
    core.clock.now = 11  # the leases expire: the same tasks go out again
    again = request_tasks(core, identity=b"alive")
    assert [t.sampling.seed for t in again] == [t.sampling.seed for t in first]
    # A group whose rollouts all errored is refused; the fresh example drawn in its place is slot 2.
    errored = roll_out(again[0], 0)
    for rollout in errored.rollouts:
        rollout.error = "inference down"
    assert not core.on_result(errored).accepted
    (replacement,) = request_tasks(core, num_tasks=0, identity=b"alive")
    assert replacement.sampling.seed == sampling_seed(3, 1, 2)


def built_batch(tmp_path, arrival: list[int]) -> tuple[list[np.ndarray], float]:
    """Step 1's packed tokens and advantages, and its mean reward, with results arriving in ``arrival`` order."""
    core = make_core(make_config(tmp_path, batch_size=8, rollouts_per_example=2, seq_len=256))
    tasks = request_tasks(core)
    for index in arrival:  # same lengths (the packer sorts by length), other advantages: the order shows
        result = roll_out(tasks[index], 0, rewards=[0.1 * index, 1.0 / (index + 3)])
        assert core.on_result(result).accepted
    ((step, metrics),) = core.tick().metrics
    batch = core.on_batch_request(b"t", BatchRequest(trainer_id="t", rank=0, world_size=1, step=1))
    assert step == 1 and batch is not None and batch.step == 1
    arrays = [np.concatenate([mb.input_ids, mb.advantages.view(np.int32)]) for mb in batch.micro_batches]
    return arrays, metrics["reward/all/mean"]


def test_a_batch_is_the_same_whatever_order_its_results_arrive_in(tmp_path):
    in_order = built_batch(tmp_path / "a", [0, 1, 2, 3])
    reversed_order = built_batch(tmp_path / "b", [3, 1, 0, 2])
    assert len(in_order[0]) == len(reversed_order[0])
    assert all(np.array_equal(a, b) for a, b in zip(in_order[0], reversed_order[0], strict=True))
    assert in_order[1] == reversed_order[1]  # exactly: the same sum in the same order
