"""The chaos harness without a run: its waits (a wait that can no longer succeed because the run
ended fails at once) and its audit over metrics.jsonl and the orchestrator's journal."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.integration.chaos_run import ChaosFailure, ChaosRun, audit


class Process:
    def __init__(self, exit_code: int | None) -> None:
        self.exit_code = exit_code

    def poll(self) -> int | None:
        return self.exit_code


def write_lines(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)


def trainer_row(step: int) -> dict:
    return {"step": step, "service": "trainer", "replica_id": "trainer-rank0", "time": 1.0, "loss/mean": 0.1}


def run_in(tmp_path: Path, orchestrator: Process | None = None, max_steps: int = 9) -> ChaosRun:
    """A ChaosRun with only what its waits and audit read (starting one needs a whole run)."""
    run = ChaosRun.__new__(ChaosRun)
    run.children, run.timeout_s = {"orchestrator": orchestrator or Process(None)}, 600
    run.output_dir = tmp_path
    run.config = SimpleNamespace(max_steps=max_steps)
    return run


def run_with_orchestrator(tmp_path, orchestrator: Process) -> ChaosRun:
    run = run_in(tmp_path, orchestrator)
    # Another service's row and a half-written last line must not count as trainer steps.
    write_lines(tmp_path / "metrics.jsonl", [trainer_row(8), {"step": 9, "service": "orchestrator", "time": 1.0},
                                             trainer_row(9)], tail='{"step": 10, "serv')  # fmt: skip
    return run


def test_a_wait_fails_at_once_with_the_reason_when_the_run_has_ended(tmp_path):
    run = run_with_orchestrator(tmp_path, Process(exit_code=0))
    started = time.monotonic()
    with pytest.raises(ChaosFailure, match=r"the run ended \(trainer at step 9 of 9\) before env-worker-0 to be ready"):
        run.wait_during_run(lambda: False, "env-worker-0 to be ready again")
    assert time.monotonic() - started < 60  # not the 600 s timeout


def test_a_wait_that_is_met_returns_even_after_the_run_ended(tmp_path):
    run = run_with_orchestrator(tmp_path, Process(exit_code=0))
    assert run.wait_during_run(lambda: True, "anything") <= time.monotonic()


def test_audit_finds_a_step_trained_twice_and_one_never_trained(tmp_path):
    run = run_in(tmp_path, max_steps=4)
    write_lines(tmp_path / "metrics.jsonl", [trainer_row(1), trainer_row(2), trainer_row(2)])
    acked = [{"kind": "acked", "time": 1.0, "step": step} for step in (1, 2)]
    write_lines(tmp_path / "checkpoints" / "orchestrator" / "journal.jsonl", acked)
    result = audit(run)
    assert result.duplicate_steps == [2] and result.skipped_steps == [3, 4] and not result.ok


def test_audit_counts_an_acknowledged_step_whose_report_was_lost(tmp_path):
    # A trainer killed right after acknowledging step 3 may never have its report reach the monitor.
    run = run_in(tmp_path, max_steps=3)
    write_lines(tmp_path / "metrics.jsonl", [trainer_row(1), trainer_row(2)])
    acked = [{"kind": "acked", "time": 1.0, "step": step} for step in (1, 2, 3)]
    write_lines(tmp_path / "checkpoints" / "orchestrator" / "journal.jsonl", acked)
    result = audit(run)
    assert result.trained_steps == [1, 2, 3] and result.ok, result
    assert run.trainer_step() == 3
