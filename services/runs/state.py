"""A run's state now: whether any of it may still run, and its status (:func:`.registry.status_of`).

A local run lives as long as its wrapper process (:mod:`.process`). A SLURM run also lives while
its jobs do after the wrapper is gone without recording an exit (:mod:`.slurm`).
"""

from __future__ import annotations

import time
from typing import NamedTuple

from rlbus.services.launcher.slurm_ctl import SlurmCtl
from rlbus.services.runs import process, slurm
from rlbus.services.runs.registry import Registry, RunRecord, status_of

POLL_S = 0.5


class RunState(NamedTuple):
    alive: bool
    """Some process of the run (its wrapper, or a SLURM task) may still be running."""
    status: str
    """``running``, ``stopping``, ``completed``, ``failed`` or ``stopped``."""


def state_of(record: RunRecord, ctl: SlurmCtl | None = None) -> RunState:
    wrapper_alive = process.is_alive(record)
    if not record.slurm or wrapper_alive or record.exit_code is not None:
        # The wrapper follows its jobs and records how they ended: it alone decides.
        return RunState(wrapper_alive, status_of(record, wrapper_alive))
    tasks = slurm.job_tasks(record, ctl or SlurmCtl())
    if slurm.jobs_active(tasks):
        return RunState(True, status_of(record, True))
    return RunState(False, status_of(record, False, slurm.ended_as(record, tasks or [])))


def wait_ended(registry: Registry, run_id: str, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` until nothing of the run runs; True when nothing does."""
    deadline = time.monotonic() + timeout_s
    while state_of(registry.load(run_id)).alive:
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True
