"""A TrainBatch names the groups its step was built from (the trainer's audit trail records them)."""

from rlbus.messages import BatchRequest, TrainBatch

from .test_core import finish, make_config, make_core, request_tasks


def test_every_rank_of_a_step_gets_the_task_ids_of_its_groups(tmp_path):
    core = make_core(make_config(tmp_path, trainer_world_size=2))
    tasks = request_tasks(core)
    finish(core, tasks, policy_step=0)
    batches = [core.on_batch_request(b"t", BatchRequest(trainer_id="t", rank=r, world_size=2, step=1))
               for r in range(2)]  # fmt: skip
    assert all(isinstance(batch, TrainBatch) for batch in batches)
    assert [sorted(batch.task_ids) for batch in batches] == [sorted(t.task_id for t in tasks)] * 2
