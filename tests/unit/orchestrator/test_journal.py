"""The orchestrator's journal: a restarted core rebuilds from every accepted group, none twice."""

from __future__ import annotations

import errno
import os

import msgspec
import pytest
from loguru import logger

from rlbus.messages import BatchAck, BatchRequest
from rlbus.services.orchestrator.checkpoint import ProgressStore
from rlbus.services.orchestrator.journal import Journal, _Scan, read_history, read_records, replay_records

from .fakes import roll_out
from .test_core import RecordingOrchestrator, load_policy, make_config, request_tasks


def make_core(config, store, journal_path, resume=None, replay=None):
    journal = Journal(journal_path).open()
    return RecordingOrchestrator(config, train_sizes=[10, 20], eval_sizes=[], progress=store, resume=resume,
                                 journal=journal, replay=replay)  # fmt: skip


def trained_tasks(path) -> dict[int, list[str]]:
    """Step -> task ids of the last ``built`` record of each step."""
    return {r["step"]: r["task_ids"] for r in read_history(path) if r["kind"] == "built"}


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
    ]  # fmt: skip
    replay = replay_records(records, step=1)
    assert [r.task_id for r in replay.results] == ["b"] and replay.accepted_task_ids == {"a", "b"}
    path.write_bytes(b'{"kind": "built", "step": 1, "task_ids": ["a"]}\n{"kind": "acc')
    assert read_records(path) == [{"kind": "built", "step": 1, "task_ids": ["a"]}]


def accepted_line(task_id: str, reward: str = "1.0") -> bytes:
    rollout = (f'{{"rollout_id": "{task_id}/0", "reward": {reward}, "turns": [{{"prompt_ids": [1], '
               f'"completion_ids": [1001], "completion_logprobs": [-0.5], "completion_mask": [true], '
               f'"policy_step": 0}}]}}')  # fmt: skip
    return (f'{{"kind": "accepted", "result": {{"task_id": "{task_id}", "worker_id": "w", "env_id": "a", '
            f'"example_id": 0, "rollouts": [{rollout}]}}}}\n').encode()  # fmt: skip


def test_a_torn_last_line_is_cut_off_on_open_so_the_next_record_is_kept(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(accepted_line("a") + accepted_line("b")[:40])  # killed in the middle of a write
    journal = Journal(path).open()
    journal.built(1, ["a"])
    journal.close()
    assert [r["kind"] for r in read_records(path)] == ["accepted", "built"]
    assert Journal(path).replay(0).built_after == {1: ["a"]}


def test_short_writes_are_completed_and_a_failed_write_leaves_no_half_record(tmp_path, monkeypatch):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path).open()
    real_write, calls = os.write, []

    def short_write(fd, data):  # the OS may take fewer bytes than offered
        calls.append(len(data))
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", short_write)
    journal.built(1, ["a", "b"])
    assert len(calls) > 1, "the journal must write through os.write and loop on short writes"

    def failing_write(fd, data):  # a disk that fills up halfway through a record
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError):
        journal.built(2, ["c"])
    monkeypatch.setattr(os, "write", real_write)
    journal.built(3, ["d"])
    journal.close()
    assert Journal(path).replay(0).built_after == {1: ["a", "b"], 3: ["d"]}


def test_replay_skips_counts_and_names_records_that_do_not_decode_or_validate(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"".join([
        accepted_line("nan", reward="null"),  # a NaN reward, as JSON writes it
        b'{"kind": "built", "step": "two", "task_ids": ["x"]}\n',
        b"[1, 2]\n",
        b'{"kind": "accepted"}\n',
        b"not json\n",
        accepted_line("good"),
    ]))  # fmt: skip
    messages = []
    handler = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        replay = Journal(path).replay(0)
    finally:
        logger.remove(handler)
    assert [r.task_id for r in replay.results] == ["good"] and replay.num_skipped == 5
    assert "nan" not in replay.accepted_task_ids  # a resent copy is judged again, not refused as a duplicate
    assert any("line 1" in m and "reward" in m for m in messages), messages
    assert any("line 2" in m and "step" in m for m in messages), messages


def run_steps(core, num_steps: int, sizes: list[int] | None = None) -> None:
    """Build and acknowledge ``num_steps`` steps, buffering one extra group each time."""
    for _ in range(num_steps):
        step = core.step
        load_policy(core, step - 1)
        tasks = request_tasks(core)
        assert len(tasks) == core.groups_per_batch
        for task in tasks:
            assert core.on_result(roll_out(task, step - 1)).accepted
        core.tick()
        assert core.step == step + 1
        core.on_batch_ack(BatchAck(trainer_id="t", step=step))
        if sizes is not None:
            sizes.append(core.journal.path.stat().st_size)


def replay_state(replay):
    return ([msgspec.json.encode(r) for r in replay.results], replay.accepted_task_ids, replay.built_after)


def test_compaction_keeps_exactly_what_a_replay_after_the_step_needs(tmp_path):
    config = make_config(tmp_path, max_async_level=5, max_steps=None)
    path = tmp_path / "journal.jsonl"
    core = make_core(config, None, path)  # no progress store: nothing compacts by itself
    run_steps(core, 3)
    for task in request_tasks(core):  # step 4 built, not acknowledged
        assert core.on_result(roll_out(task, 3)).accepted
    core.tick()
    extra, gone = request_tasks(core)[:2]
    for task in (extra, gone):  # accepted, not in a batch
        assert core.on_result(roll_out(task, 3)).accepted
    core.journal.dropped("stale", [gone.task_id])
    before = replay_state(Journal(path).replay(3))
    core.journal.compact(3)
    core.journal.built(5, ["later"])  # appends go on after a compaction
    core.journal.close()
    after = Journal(path).replay(3)
    assert replay_state(after)[:2] == before[:2] and after.built_after == {**before[2], 5: ["later"]}
    assert len(read_records(path)) == 1 + 3 + 2  # ids known, 3 groups kept, 2 built steps


def test_a_long_run_compacted_at_each_checkpoint_keeps_a_small_journal_and_restarts_in_place(tmp_path):
    config = make_config(tmp_path, max_async_level=5, ckpt={"interval": 1}, max_steps=None)
    store, path = ProgressStore(tmp_path / "progress"), tmp_path / "journal.jsonl"
    core = make_core(config, store, path)
    sizes: list[int] = []
    run_steps(core, 60, sizes)
    # Only the ids of trained groups pile up (a few bytes each), not their rollouts.
    assert sizes[-1] < sizes[4] + 60 * 2 * 40, sizes
    extra = request_tasks(core)[0]
    assert core.on_result(roll_out(extra, 60)).accepted
    core.journal.close()
    restarted = make_core(config, store, path, resume=store.load(-1), replay=Journal(path).replay(60))
    assert restarted.step == 61 and [g.task_id for g in restarted.buffer] == [extra.task_id]
    assert not restarted.on_result(roll_out(extra, 60)).accepted  # still known: a duplicate
    history = [r["result"]["task_id"] for r in read_history(path) if r["kind"] == "accepted"]
    assert len(history) == len(set(history)) == 60 * 2 + 1  # the audit trail holds every group once


def test_a_compaction_that_cannot_write_leaves_the_journal_whole_and_in_use(tmp_path, monkeypatch):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path).open()
    journal.built(1, ["a"])
    journal.built(2, ["b"])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_Scan, "write_compacted", full)
    journal.compact(1)
    journal.built(3, ["c"])
    journal.close()
    assert Journal(path).replay(1).built_after == {2: ["b"], 3: ["c"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.jsonl"]


def test_discarding_a_journal_moves_its_compacted_segments_aside_too(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path).open()
    journal.built(1, ["a"])
    journal.compact(1)
    journal.close()
    assert len(Journal(path).segments()) == 1
    Journal(path).discard()  # a fresh start: none of this history belongs to the new run
    assert Journal(path).segments() == [] and read_history(path) == []
    assert len(list(tmp_path.glob("journal*.discarded"))) == 2
