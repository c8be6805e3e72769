"""Leases and credits: expired tasks come back, duplicates are recognised, credits are honoured."""

import msgspec
import pytest

from rlbus.messages import RolloutTask, SamplingParams, TaskRequest
from rlbus.services.orchestrator.leases import Completion, TaskLedger, WorkerPool, dispatch


def task(task_id: str, env_id: str = "e") -> RolloutTask:
    return RolloutTask(task_id=task_id, env_id=env_id, example_id=0, num_rollouts=2, sampling=SamplingParams(),
                       lease_s=0, issued_at=0)


def test_no_worker_gets_more_tasks_than_its_credits():
    ledger, pool = TaskLedger(lease_s=10), WorkerPool()
    for i in range(5):
        ledger.add(task(f"t{i}"))
    pool.grant(b"a", TaskRequest(worker_id="a", num_tasks=2))
    pool.grant(b"b", TaskRequest(worker_id="b", num_tasks=1))
    sends = dispatch(ledger, pool, now=0, wall_time=100)
    assert sorted(w for w, _ in sends) == [b"a", b"a", b"b"]
    assert [t.task_id for _, t in sends] == ["t0", "t1", "t2"]
    assert all(t.lease_s == 10 and t.issued_at == 100 for _, t in sends)
    assert list(ledger.queue) == ["t3", "t4"]
    pool.grant(b"b", TaskRequest(worker_id="b", num_tasks=1))
    assert [t.task_id for _, t in dispatch(ledger, pool, now=1, wall_time=101)] == ["t3"]


def test_tasks_only_go_to_workers_running_their_environment():
    ledger, pool = TaskLedger(lease_s=10), WorkerPool()
    ledger.add(task("math", env_id="math"))
    ledger.add(task("code", env_id="code"))
    pool.grant(b"a", TaskRequest(worker_id="a", num_tasks=5, env_ids=["code"]))
    assert [(w, t.task_id) for w, t in dispatch(ledger, pool, 0, 0)] == [(b"a", "code")]
    assert list(ledger.queue) == ["math"]


def test_expired_lease_is_issued_again_and_the_late_result_is_a_duplicate():
    ledger, pool = TaskLedger(lease_s=5), WorkerPool()
    ledger.add(task("t0"))
    pool.grant(b"slow", TaskRequest(worker_id="slow", num_tasks=1))
    dispatch(ledger, pool, now=0, wall_time=0)
    assert ledger.expire(now=4.9) == [] and ledger.next_deadline() == 5
    assert ledger.expire(now=5.0) == ["t0"] and ledger.num_reissued == 1
    pool.grant(b"fast", TaskRequest(worker_id="fast", num_tasks=1))
    assert [w for w, _ in dispatch(ledger, pool, now=6, wall_time=6)] == [b"fast"]
    status, original = ledger.complete("t0")
    assert status is Completion.NEW and original.task_id == "t0"
    assert ledger.complete("t0") == (Completion.DUPLICATE, None)
    assert ledger.expire(now=100) == [] and ledger.next_deadline() is None


def test_result_for_a_requeued_task_closes_it_and_dispatch_skips_it():
    ledger, pool = TaskLedger(lease_s=1), WorkerPool()
    ledger.add(task("t0"))
    pool.grant(b"a", TaskRequest(worker_id="a", num_tasks=1))
    dispatch(ledger, pool, 0, 0)
    ledger.expire(now=2)
    assert ledger.complete("t0")[0] is Completion.NEW
    pool.grant(b"a", TaskRequest(worker_id="a", num_tasks=1))
    assert dispatch(ledger, pool, 3, 3) == [] and pool.num_credits == 1


def test_released_worker_tasks_go_to_the_front_of_the_queue():
    ledger, pool = TaskLedger(lease_s=100), WorkerPool()
    for i in range(3):
        ledger.add(task(f"t{i}"))
    pool.grant(b"a", TaskRequest(worker_id="a", num_tasks=2))
    dispatch(ledger, pool, 0, 0)
    assert ledger.release_worker(b"a") == ["t0", "t1"]
    assert list(ledger.queue) == ["t0", "t1", "t2"]


def test_unknown_result_is_remembered_as_finished():
    ledger = TaskLedger(lease_s=1)
    assert ledger.complete("old-run-7") == (Completion.UNKNOWN, None)
    assert ledger.complete("old-run-7") == (Completion.DUPLICATE, None)


def test_reissued_count_is_reported_once_and_starts_again():
    ledger, pool = TaskLedger(lease_s=1), WorkerPool()
    for i in range(3):
        ledger.add(task(f"t{i}"))
    pool.grant(b"a", TaskRequest(worker_id="a", num_tasks=3))
    dispatch(ledger, pool, 0, 0)
    ledger.expire(now=2)
    assert ledger.take_num_reissued() == 3 and ledger.take_num_reissued() == 0
    ledger.release_worker(b"a")  # nothing leased any more: nothing re-issued
    assert ledger.take_num_reissued() == 0


def test_open_tasks_are_counted_by_kind_and_listed_oldest_first():
    ledger = TaskLedger(lease_s=1)
    ledger.add(task("t0"))
    ledger.add(msgspec.structs.replace(task("e0"), is_eval=True))
    ledger.add(task("t1"))
    assert (ledger.num_open(), ledger.num_open(is_eval=False), ledger.num_open(is_eval=True)) == (3, 2, 1)
    ledger.complete("t0")
    assert ledger.open_task_ids() == ["e0", "t1"]


def test_tasks_finished_before_a_restart_are_duplicates_and_cannot_be_added_again():
    ledger = TaskLedger(lease_s=1)
    ledger.mark_finished({"old-1", "old-2"})
    assert ledger.complete("old-1") == (Completion.DUPLICATE, None)
    with pytest.raises(ValueError, match="already used"):
        ledger.add(task("old-2"))


def test_worker_names_for_logs():
    pool = WorkerPool()
    pool.grant(b"id-1", TaskRequest(worker_id="worker-a", num_tasks=1))
    assert pool.name_of(b"id-1") == "worker-a"
    pool.forget(b"id-1")
    assert pool.name_of(b"id-1") == "b'id-1'"
