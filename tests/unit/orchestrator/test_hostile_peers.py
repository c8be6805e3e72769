"""Well-formed messages with hostile values from an admitted peer (found by
tests/integration/test_fuzz_hostile_values.py): the core refuses them or stays unharmed.

Trusted by design, so not tested here (docs/security.md): a trainer's step in a
``BatchRequest`` (a trainer resumed from a checkpoint ahead of the orchestrator moves it
ahead), and the ``worker_id`` of a result (any admitted worker may deliver a task's result)."""

import pytest

from rlbus.messages import BatchAck, BatchRequest, PolicyLoaded, Refused

from .fakes import roll_out
from .test_core import make_config, make_core, request_tasks


def test_a_result_naming_a_future_task_id_cannot_kill_the_orchestrator(tmp_path):
    core = make_core(make_config(tmp_path))
    tasks = request_tasks(core, identity=b"good")
    run_id, number = tasks[-1].task_id.rsplit("-", 1)
    forged = roll_out(tasks[0], 0, worker_id="hostile")
    forged.task_id = f"{run_id}-{int(number) + 1}"
    core.on_result(forged)  # refused or adopted: either way the run must go on
    for task in tasks:
        core.on_result(roll_out(task, 0))
    core.tick()  # before: issuing the forged id raised "task id ... is already used"
    issued = [task.task_id for task in request_tasks(core)]
    assert issued and forged.task_id not in issued


def test_a_batch_ack_for_a_step_never_built_does_not_skip_steps(tmp_path):
    core = make_core(make_config(tmp_path))
    request_tasks(core)
    with pytest.raises(ValueError, match="step 3, which was never built"):
        core.on_batch_ack(BatchAck(trainer_id="hostile", step=3))
    assert core.step == 1 and not core.store.is_acked(3)


def test_a_policy_step_that_was_never_built_is_refused(tmp_path):
    core = make_core(make_config(tmp_path))
    reply = core.on_policy_loaded(PolicyLoaded(replica_id="hostile", base_url="x", step=10**9, loaded_at=0.0))
    assert isinstance(reply, Refused) and "newer than any step" in reply.reason
    assert core.gate.policy_step == 0


def test_a_policy_refused_before_a_fast_forward_is_taken_after_it(tmp_path):
    """A fresh orchestrator behind a resumed trainer: the replica's report of step 50 is refused
    until the trainer's request for step 51 moves the orchestrator there; the next report fits."""
    core = make_core(make_config(tmp_path, max_steps=100))
    report = PolicyLoaded(replica_id="inference-0", base_url="x", step=50, loaded_at=0.0)
    assert isinstance(core.on_policy_loaded(report), Refused)
    core.on_batch_request(b"t", BatchRequest(trainer_id="t", rank=0, world_size=1, step=51))
    assert core.on_policy_loaded(report).ref == "policy:50" and core.gate.policy_step == 50
