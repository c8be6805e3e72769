"""The orchestrator's journal: a restarted core rebuilds from every accepted group, none twice."""

from __future__ import annotations

from rlbus.messages import BatchAck, BatchRequest
from rlbus.services.orchestrator.checkpoint import ProgressStore
from rlbus.services.orchestrator.journal import Journal, read_records, replay_records

from .fakes import roll_out
from .test_core import RecordingOrchestrator, make_config, request_tasks


def make_core(config, store, journal_path, resume=None, replay=None):
    journal = Journal(journal_path).open()
    return RecordingOrchestrator(config, train_sizes=[10, 20], eval_sizes=[], progress=store, resume=resume,
                                 journal=journal, replay=replay)  # fmt: skip


def trained_tasks(path) -> dict[int, list[str]]:
    """Step -> task ids of the last ``built`` record of each step."""
    return {r["step"]: r["task_ids"] for r in read_records(path) if r["kind"] == "built"}


def test_a_killed_orchestrator_loses_no_accepted_group_and_trains_none_twice(tmp_path):
    config = make_config(tmp_path, max_async_level=5, ckpt={"interval": 1}, max_steps=4)
    store, path = ProgressStore(tmp_path / "progress"), tmp_path / "journal.jsonl"
    core = make_core(config, store, path)
    accepted = []
    for _ in range(2):  # steps 1 and 2 built
        for task in request_tasks(core):
            assert core.on_result(roll_out(task, 0)).accepted
            accepted.append(task.task_id)
        core.tick()
    core.on_batch_ack(BatchAck(trainer_id="t", step=1))  # progress of step 1 saved; step 2 built, not acked
    extra = request_tasks(core)[:1]  # one more group accepted, not in a batch yet
    assert core.on_result(roll_out(extra[0], 0)).accepted
    accepted.append(extra[0].task_id)
    resent = roll_out(extra[0], 0)
    sent = core.store.get(2, 0)  # a trainer may hold this batch already
    # The process dies here: everything in memory is gone.

    restarted = make_core(config, store, path, resume=store.load(-1), replay=Journal(path).replay(1))
    assert restarted.step == 3 and len(restarted.buffer) == 1  # step 2 rebuilt, the extra group buffered
    again = restarted.store.get(2, 0)
    assert again.num_loss_tokens == sent.num_loss_tokens
    assert [m.input_ids.tolist() for m in again.micro_batches] == [m.input_ids.tolist() for m in sent.micro_batches]
    assert not restarted.on_result(resent).accepted  # its ack was lost; the journal knows the task
    for task in request_tasks(restarted):
        assert restarted.on_result(roll_out(task, 0)).accepted
        accepted.append(task.task_id)
    restarted.tick()
    restarted.on_batch_ack(BatchAck(trainer_id="t", step=2))  # the trainer trained the batch it had
    assert restarted.on_batch_request(b"t", BatchRequest(trainer_id="t", rank=0, world_size=1, step=3)) is not None

    steps = trained_tasks(path)
    assert steps[2] == accepted[2:4]  # step 2 rebuilt from the very same groups
    in_steps = [t for task_ids in steps.values() for t in task_ids]
    assert len(in_steps) == len(set(in_steps))  # no group in two steps
    assert set(in_steps) <= set(accepted) and set(accepted[:6]) <= set(in_steps)


def test_replay_skips_a_line_cut_off_by_a_crash_and_groups_already_trained(tmp_path):
    path = tmp_path / "journal.jsonl"
    records = [
        {"kind": "accepted", "result": {"task_id": "a", "worker_id": "w", "env_id": "e", "example_id": 0,
                                        "rollouts": []}},
        {"kind": "accepted", "result": {"task_id": "b", "worker_id": "w", "env_id": "e", "example_id": 1,
                                        "rollouts": []}},
        {"kind": "built", "step": 1, "task_ids": ["a"]},
    ]
    replay = replay_records(records, step=1)
    assert [r.task_id for r in replay.results] == ["b"] and replay.accepted_task_ids == {"a", "b"}
    path.write_bytes(b'{"kind": "built", "step": 1, "task_ids": ["a"]}\n{"kind": "acc')
    assert read_records(path) == [{"kind": "built", "step": 1, "task_ids": ["a"]}]
