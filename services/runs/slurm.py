"""Runs started with ``rlbus run --slurm``: their job arrays, what SLURM says of them, cancelling them.

The detached wrapper runs ``rlbus rl --slurm``, which submits one array per service, writes their
ids to ``<output_dir>/slurm_jobs.json`` and follows the run from this host (docs/slurm.md). The
wrapper copies those ids into the registry as soon as they appear (:func:`record_jobs`), so the
run can be found on the cluster without it. While the wrapper lives, it decides how the run ends
and records that. When it is gone without a record (``kill -9``, this host rebooted) the jobs may
still run, so the controller is asked (``squeue -t all``):

- some task has not ended: the run is alive (``running``, ``stopping`` after a stop);
- every task ended: ``completed`` when the orchestrator's task completed, else ``failed``;
- the controller forgot them (``MinJobAge`` after their end): ``completed`` when the run's
  ``steps.jsonl`` reached ``max_steps``, else ``failed``.
"""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from rlbus.services.launcher.slurm import JOBS_FILE
from rlbus.services.launcher.slurm_ctl import SlurmCtl, SlurmError, TaskState
from rlbus.services.runs.progress import read_progress
from rlbus.services.runs.registry import COMPLETED, FAILED, Registry, RunRecord

FORGOTTEN = "Invalid job id"
"""What ``squeue -j`` says of a job id the controller no longer knows (an error, when it is the only one)."""


def read_jobs(record: RunRecord) -> dict[str, str]:
    """Service -> array job id from the run folder's jobs file, when this run wrote it (not an earlier
    run in the same folder); empty before the arrays are submitted."""
    path = Path(record.output_dir) / JOBS_FILE
    try:
        if path.stat().st_mtime < record.started:
            return {}
        rows = json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or caught while being written
        return {}
    return {row["service"]: row["array_job_id"] for row in rows}


def record_jobs(registry: Registry, record: RunRecord) -> RunRecord:
    """``record`` with its job ids, copied into the registry the first time they are found."""
    if not record.slurm or record.slurm_jobs:
        return record
    jobs = read_jobs(record)
    if not jobs:
        return record
    try:
        return registry.update(record.id, slurm_jobs=jobs)
    except FileNotFoundError:  # deleted meanwhile
        return record


def job_tasks(record: RunRecord, ctl: SlurmCtl) -> list[TaskState] | None:
    """Every task of the run's arrays the controller still knows; None when it cannot be asked."""
    if not record.slurm_jobs:
        return []
    try:
        return ctl.tasks(record.slurm_jobs.values())
    except SlurmError as exc:
        if FORGOTTEN in str(exc):
            return []
        logger.warning("run {}: cannot ask SLURM about its jobs, taking them as running: {}", record.id, exc)
        return None


def jobs_active(tasks: list[TaskState] | None) -> bool:
    """Whether some task may still run (not knowing counts as yes: the jobs are not proven gone)."""
    return tasks is None or any(not task.terminal for task in tasks)


def ended_as(record: RunRecord, tasks: list[TaskState]) -> str:
    """How a run whose tasks all ended did, without the wrapper's record (see the module docstring)."""
    if tasks:
        orchestrator = record.slurm_jobs.get("orchestrator")
        done = [t for t in tasks if t.array_job_id == orchestrator and t.state == "COMPLETED"]
        return COMPLETED if done else FAILED
    step = read_progress(Path(record.output_dir)).step
    reached = record.max_steps is not None and step is not None and step >= record.max_steps
    return COMPLETED if reached else FAILED


def cancel(record: RunRecord, ctl: SlurmCtl, force: bool) -> None:
    """``scancel`` every array of the run: SIGTERM to each service (SLURM kills it after ``KillWait``);
    ``force``: SIGKILL to each task's batch step (the service, which the job script ``exec``s) first."""
    ids = list(record.slurm_jobs.values())
    if not ids:
        return
    commands = [["scancel", *ids]]
    if force:
        commands.insert(0, ["scancel", "--signal=KILL", "--batch", *ids])
    for argv in commands:
        try:
            ctl.run(argv)
        except SlurmError as exc:  # e.g. some of the jobs ended already
            logger.debug("run {}: {}", record.id, exc)
