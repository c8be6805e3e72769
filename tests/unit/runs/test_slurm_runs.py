"""SLURM runs in the registry: their job ids, their state when the wrapper is gone, cancelling them.

The controller is a stand-in answering ``squeue`` as SLURM 22.05 does (rows of ``QUEUE_FORMAT``,
and ``Invalid job id`` for a single id it no longer knows); tests/integration/test_slurm.py runs
the same code against a real SLURM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import pytest

from rlbus.services.launcher.slurm_ctl import SlurmCtl, SlurmError
from rlbus.services.runs import slurm
from rlbus.services.runs.registry import Registry, RunRecord
from rlbus.services.runs.state import state_of

JOBS = {"monitor": "11", "orchestrator": "12", "trainer": "13", "inference": "14", "env-worker": "15"}


class FakeCtl(SlurmCtl):
    """Answers ``squeue`` with ``queue`` (an exception: raised), records every command."""

    def __init__(self, queue: str | Exception) -> None:
        self.queue, self.commands = queue, []

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        self.commands.append(list(argv))
        if argv[0] == "squeue" and isinstance(self.queue, Exception):
            raise self.queue
        if argv[0] == "scancel" and "--signal=KILL" in argv:
            raise SlurmError("scancel --signal=KILL failed (exit 1): Job/step already completing or completed")
        return self.queue if argv[0] == "squeue" else ""


def queue(orchestrator: str, others: str) -> str:
    """squeue rows: the orchestrator's task in one state, every other task in another."""
    rows = [f"12_0|12|0|{orchestrator}|node1|12"]
    rows += [f"{job}_0|{job}|0|{others}|node1|{job}" for job in ("11", "13", "14")]
    rows += [f"15_{i}|{20 + i}|{i}|{others}|node1|15" for i in range(2)]
    return "\n".join(rows) + "\n"


def slurm_record(tmp_path, **changes) -> RunRecord:
    values = {"id": "abcd1234", "name": "demo", "model": "m", "output_dir": str(tmp_path / "run"),
              "console": str(tmp_path / "c.out"), "argv": [], "cwd": str(tmp_path), "host": "here",
              "started": 1000.0, "max_steps": 2, "slurm": True, "slurm_jobs": JOBS, "pid": None}  # fmt: skip
    return RunRecord(**{**values, **changes})


@pytest.mark.parametrize(
    ("answer", "changes", "expected"),
    [
        (queue("RUNNING", "RUNNING"), {}, (True, "running")),
        (queue("PENDING", "PENDING"), {}, (True, "running")),  # queued: the run has not ended
        (queue("RUNNING", "CANCELLED"), {"stop_requested": 5.0}, (True, "stopping")),
        (queue("COMPLETED", "CANCELLED"), {}, (False, "completed")),
        (queue("CANCELLED", "FAILED"), {}, (False, "failed")),
        (queue("CANCELLED", "CANCELLED"), {"stop_requested": 5.0}, (False, "stopped")),
        (SlurmError("squeue failed (exit 1): slurm_load_jobs error: Invalid job id specified"), {}, (False, "failed")),
        (SlurmError("squeue failed (exit 1): Unable to contact slurm controller"), {}, (True, "running")),
        (queue("RUNNING", "RUNNING"), {"exit_code": 0}, (False, "completed")),  # the wrapper's record wins
    ],
)
def test_without_its_wrapper_a_run_is_what_slurm_says(tmp_path, answer, changes, expected):
    ctl = FakeCtl(answer)
    assert state_of(slurm_record(tmp_path, **changes), ctl) == expected
    assert ctl.commands in ([], [["squeue", "-h", "-t", "all", "-j", "11,12,13,14,15", "-o", "%i|%A|%K|%T|%N|%F"]])


def test_jobs_slurm_forgot_are_judged_by_the_steps_done(tmp_path):
    (tmp_path / "run").mkdir()
    forgotten = FakeCtl(SlurmError("slurm_load_jobs error: Invalid job id specified"))
    (tmp_path / "run" / "steps.jsonl").write_text('{"step": 1}\n')
    assert state_of(slurm_record(tmp_path), forgotten).status == "failed"
    (tmp_path / "run" / "steps.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert state_of(slurm_record(tmp_path), forgotten).status == "completed"


def test_job_ids_are_recorded_from_this_runs_jobs_file_only(tmp_path):
    registry = Registry(tmp_path / "home")
    record = slurm_record(tmp_path, slurm_jobs={}, started=2000.0)
    registry.save(record)
    jobs_file = tmp_path / "run" / "slurm_jobs.json"
    jobs_file.parent.mkdir()
    jobs_file.write_text(json.dumps([{"service": s, "array_job_id": i} for s, i in JOBS.items()]))
    os.utime(jobs_file, (1500.0, 1500.0))  # an earlier run's arrays, in the same folder
    assert slurm.record_jobs(registry, record).slurm_jobs == {}
    os.utime(jobs_file, (2001.0, 2001.0))
    assert slurm.record_jobs(registry, record).slurm_jobs == JOBS
    assert registry.load(record.id).slurm_jobs == JOBS
    local = slurm_record(tmp_path, id="local000", slurm=False, slurm_jobs={})
    assert slurm.record_jobs(registry, local) is local  # not asked: no SLURM here


@pytest.mark.parametrize("force", [False, True])
def test_cancel_scancels_every_array_and_force_kills_first(tmp_path, force):
    ctl = FakeCtl("")
    slurm.cancel(slurm_record(tmp_path), ctl, force)  # an error of the forced kill (jobs ended) is no failure
    ids = list(JOBS.values())
    kill = [["scancel", "--signal=KILL", "--batch", *ids]] if force else []
    assert ctl.commands == [*kill, ["scancel", *ids]]
    slurm.cancel(slurm_record(tmp_path, slurm_jobs={}), ctl, force)  # nothing submitted yet: nothing to do
    assert len(ctl.commands) == len(kill) + 1
