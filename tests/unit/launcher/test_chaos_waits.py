"""ChaosRun's waits: a wait that can no longer succeed because the run ended fails at once."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from services.launcher.chaos import ChaosFailure, ChaosRun


class Process:
    def __init__(self, exit_code: int | None) -> None:
        self.exit_code = exit_code

    def poll(self) -> int | None:
        return self.exit_code


def run_with_orchestrator(tmp_path, orchestrator: Process) -> ChaosRun:
    """A ChaosRun with only what its waits read (starting one needs a whole run)."""
    run = ChaosRun.__new__(ChaosRun)
    run.children, run.timeout_s, run.logs_dir = {"orchestrator": orchestrator}, 600, tmp_path
    run.config = SimpleNamespace(max_steps=9)
    (tmp_path / "trainer.log").write_text("step 8 | loss 0.1\nstep 9 | loss 0.1\n")
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
