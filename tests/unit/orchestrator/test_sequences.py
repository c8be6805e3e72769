"""A rollout of several token sequences (a harness that rewrote its history): one sample per sequence in
rl, each with the rollout's advantage; refused in the modes that train one sequence per rollout."""

import msgspec
import numpy as np

from rlbus.messages import Rollout, RolloutResult, Turn
from rlbus.services.orchestrator.buffer import Group
from rlbus.services.orchestrator.builder import build_step
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.rollouts import branched_problem, sequences, to_samples
from rlbus.services.orchestrator.sampler import Draw


def turn(prompt: list[int], completion: list[int], starts: bool = False, trained: bool = True) -> Turn:
    return Turn(prompt_ids=prompt, completion_ids=completion, completion_logprobs=[-0.5] * len(completion),
                completion_mask=[trained] * len(completion), policy_step=0, starts_sequence=starts)  # fmt: skip


# Sequence 1: prompt 1 2, reply 3 4, env 5, reply 6. Sequence 2 (a summary): prompt 8 9, reply 10.
BRANCHED = Rollout(rollout_id="t/0", reward=1.0,
                   turns=[turn([1, 2], [3, 4]), turn([5], [6]), turn([8, 9], [10], starts=True)])  # fmt: skip


def test_each_sequence_is_a_sample_with_the_rollouts_advantage():
    assert [len(s) for s in sequences(BRANCHED)] == [2, 1]
    first, second = to_samples(BRANCHED, advantage=0.5, temperature=1.0)
    assert first.input_ids.tolist() == [1, 2, 3, 4, 5, 6] and second.input_ids.tolist() == [8, 9, 10]
    assert first.loss_mask.tolist() == [False, False, True, True, False, True]
    assert second.loss_mask.tolist() == [False, False, True]
    assert first.advantage == second.advantage == 0.5
    np.testing.assert_allclose(second.inference_logprobs, [0, 0, -0.5])
    # The flag on a first turn changes nothing: it always starts the rollout's first sequence.
    flagged = msgspec.structs.replace(BRANCHED, turns=[msgspec.structs.replace(BRANCHED.turns[0], starts_sequence=True),
                                                       *BRANCHED.turns[1:]])  # fmt: skip
    assert [s.input_ids.tolist() for s in to_samples(flagged, 0.5, 1.0)] == [[1, 2, 3, 4, 5, 6], [8, 9, 10]]


def test_a_built_step_trains_every_sequence(tmp_path):
    config = OrchestratorConfig(batch_size=2, rollouts_per_example=2, seq_len=64, max_steps=3, output_dir=tmp_path,
                                train={"env": [{"id": "e"}]})  # fmt: skip
    plain = Rollout(rollout_id="t/1", reward=0.0, turns=[turn([1, 2], [3])])
    built = build_step(1, [Group("task", "e", Draw(0, 0), [BRANCHED, plain])], config)
    ((batch,),) = [built.batches]
    assert built.num_samples == 3 and batch.num_loss_tokens == 3 + 1 + 1


def test_modes_that_train_one_sequence_per_rollout_refuse_branched_results():
    result = RolloutResult(task_id="t", worker_id="w", env_id="e", example_id=0, rollouts=[BRANCHED])
    problem = branched_problem(result)
    assert problem is not None and "2 token sequences" in problem and "training_mode = 'rl'" in problem
    errored = msgspec.structs.replace(BRANCHED, error="env raised")
    plain = Rollout(rollout_id="t/1", reward=0.0, turns=[turn([1], [2], starts=True), turn([3], [4])])
    assert branched_problem(msgspec.structs.replace(result, rollouts=[errored, plain])) is None
