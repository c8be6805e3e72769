"""The chaos harness without a run: its waits (a wait that can no longer succeed because the run
ended fails at once), its restarts of a service that died at a fault point, and its audit over the
env-workers' and the trainer's audit trails (not the orchestrator's journal under test)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlbus.services.launcher.processes import ProcessSpec
from tests.integration import chaos_run
from tests.integration.chaos_run import ChaosFailure, ChaosRun, audit

DUPLICATE = "duplicate: this task already has a result"


class Process:
    def __init__(self, exit_code: int | None) -> None:
        self.exit_code = exit_code

    def poll(self) -> int | None:
        return self.exit_code


def write_lines(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)


def step_record(step: int, task_ids: list[str], ok: bool = True) -> dict:
    return {"time": 1.0, "trainer_id": "trainer", "step": step, "ok": ok, "task_ids": task_ids}


def answer(task_id: str, accepted: bool = True, reason: str = "", worker: str = "env-worker-0",
           is_eval: bool = False) -> dict:  # fmt: skip
    return {"time": 1.0, "worker_id": worker, "task_id": task_id, "is_eval": is_eval, "accepted": accepted,
            "reason": reason}  # fmt: skip


def run_in(tmp_path: Path, orchestrator: Process | None = None, max_steps: int = 9) -> ChaosRun:
    """A ChaosRun with only what its waits and audit read (starting one needs a whole run)."""
    run = ChaosRun.__new__(ChaosRun)
    run.children, run.timeout_s = {"orchestrator": orchestrator or Process(None)}, 600
    run.output_dir, run.audit_dir, run.logs_dir = tmp_path, tmp_path / "audit", tmp_path
    run.config = SimpleNamespace(max_steps=max_steps)
    run.specs, run.faults, run.armed, run.recoveries, run.ports = {}, {}, {}, [], {}
    return run


def write_trails(run: ChaosRun, steps: list[dict], answers: list[dict], journal: list[dict] = ()) -> None:
    write_lines(run.audit_dir / "trainer-trainer.jsonl", steps)
    write_lines(run.audit_dir / "env-worker-env-worker-0.jsonl", answers)
    write_lines(run.journal_path(), list(journal))


def test_a_wait_fails_at_once_with_the_reason_when_the_run_has_ended(tmp_path):
    run = run_in(tmp_path, Process(exit_code=0))
    # A half-written last line is not a step.
    write_lines(run.audit_dir / "trainer-trainer.jsonl", [step_record(8, []), step_record(9, [])],
                tail='{"step": 10, "tas')  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ChaosFailure, match=r"the run ended \(trainer at step 9 of 9\) before env-worker-0 to be ready"):
        run.wait_during_run(lambda: False, "env-worker-0 to be ready again")
    assert time.monotonic() - started < 60  # not the 600 s timeout


def test_a_wait_that_is_met_returns_even_after_the_run_ended(tmp_path):
    run = run_in(tmp_path, Process(exit_code=0))
    assert run.wait_during_run(lambda: True, "anything") <= time.monotonic()


def test_audit_of_a_clean_run_is_ok(tmp_path):
    run = run_in(tmp_path, max_steps=2)
    write_trails(run, [step_record(1, ["a", "b"]), step_record(2, ["c", "d"])],
                 [answer(t) for t in "abcd"] + [answer("e", is_eval=True)])  # fmt: skip
    result = audit(run)
    assert result.ok and result.num_acked == 4 and result.trained_steps == [1, 2], result


def test_audit_finds_steps_and_groups_trained_twice_and_steps_skipped(tmp_path):
    run = run_in(tmp_path, max_steps=4)
    write_trails(run, [step_record(1, ["a", "b"]), step_record(2, ["c", "a"]), step_record(2, ["c", "a"])],
                 [answer(t) for t in "abc"])  # fmt: skip
    result = audit(run)
    assert result.duplicate_steps == [2] and result.skipped_steps == [3, 4] and result.trained_twice == ["a"]
    assert not result.ok


def test_a_group_the_journal_says_it_built_but_the_trainer_never_trained_is_lost(tmp_path):
    # The journal under test claims steps 1 and 2 hold every group; the trainer's trail says otherwise.
    run = run_in(tmp_path, max_steps=2)
    built = [
        {"kind": "built", "time": 1.0, "step": s, "task_ids": ids} for s, ids in ((1, ["a", "b"]), (2, ["c", "d"]))
    ]
    acked = [{"kind": "acked", "time": 1.0, "step": s} for s in (1, 2)]
    write_trails(run, [step_record(1, ["a", "b"]), step_record(2, ["c"])], [answer(t) for t in "abcd"],
                 built + acked)  # fmt: skip
    result = audit(run)
    assert result.lost == ["d"] and not result.ok


def test_a_duplicate_refusal_counts_as_stored_unless_another_answer_refused_the_task(tmp_path):
    # "x": journaled, then the orchestrator died before its ack; the resent copy is a duplicate.
    # "y": refused as stale to one worker, so its copy at another worker is a duplicate of nothing.
    run = run_in(tmp_path, max_steps=1)
    answers = [answer("a"), answer("x", False, DUPLICATE), answer("y", False, "stale: sampled by policy 0"),
               answer("y", False, DUPLICATE, worker="env-worker-1")]  # fmt: skip
    write_trails(run, [step_record(1, ["a"])], answers)
    result = audit(run)
    assert result.num_acked == 2 and result.lost == ["x"]


def test_groups_dropped_as_stale_or_left_over_are_counted_not_lost(tmp_path):
    run = run_in(tmp_path, max_steps=1)
    journal = [{"kind": "dropped", "time": 1.0, "reason": "stale", "task_ids": ["s"]},
               {"kind": "finished", "time": 1.0, "task_ids": ["f"]}]  # fmt: skip
    write_trails(run, [step_record(1, ["a", "unseen"])], [answer(t) for t in ("a", "s", "f")], journal)
    result = audit(run)
    assert result.ok and (result.num_stale, result.num_left_over, result.num_trained_unwitnessed) == (1, 1, 1)


FAULTY_SERVICE = """
import time
from rlbus import faults
faults.point("orchestrator.before_result_ack")
time.sleep(120)
"""


def test_a_service_that_dies_at_its_fault_point_is_restarted_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(chaos_run, "service_command", lambda spec: [sys.executable, "-c", FAULTY_SERVICE])
    run = run_in(tmp_path)
    run.specs["orchestrator"] = ProcessSpec("orchestrator", "orchestrator", tmp_path / "orchestrator.toml")
    with pytest.raises(ValueError, match="unknown fault point 'orchestrator.nowhere'"):
        run.arm("orchestrator", "orchestrator.nowhere")
    run.arm("orchestrator", "orchestrator.before_result_ack")
    first = run.start("orchestrator")
    try:
        run.wait_until(lambda: bool(run.recoveries), "the restart after the fault point", 60)
        (recovery,) = run.recoveries
        assert recovery.how == "orchestrator.before_result_ack" and first.poll() == -9
        second = run.children["orchestrator"]
        assert second is not first and second.poll() is None and not run.armed
    finally:
        run.stop_all()


def test_an_armed_fault_point_never_reached_fails_the_run(tmp_path):
    run = run_in(tmp_path, Process(exit_code=0))
    run.children["trainer"] = Process(exit_code=0)
    run.specs = {"orchestrator": None, "trainer": None}
    run.armed["trainer"] = "trainer.before_batch_ack:40"
    with pytest.raises(ChaosFailure, match=r"fault points never reached .*trainer.before_batch_ack:40"):
        run.wait_for_end()
