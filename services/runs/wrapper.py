"""The detached process of a run: ``python -m rlbus.services.runs.wrapper HOME RUN_ID -- COMMAND ...``.

It runs ``COMMAND`` (``rlbus rl @ ...``) in its own process group, waits for it, and records its
exit code and end time in the registry under ``HOME``, so ``rlbus list`` can tell a run that
completed from one that failed. SIGTERM and SIGINT reach ``COMMAND`` through the group
(``rlbus stop``); the wrapper itself ignores them so it is still there to record the exit. For a
``--slurm`` run it also records the job ids as soon as ``COMMAND`` has submitted the arrays, so the
jobs can be found and cancelled even if the wrapper is killed later (:mod:`.slurm`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rlbus.services.runs import slurm
from rlbus.services.runs.registry import Registry, UnknownRun

JOBS_POLL_S = 1.0


def main(argv: Sequence[str]) -> int:
    home, run_id, separator, *command = argv
    assert separator == "--" and command, "usage: wrapper HOME RUN_ID -- COMMAND ..."
    for signum in (signal.SIGTERM, signal.SIGINT):
        # A Python handler, not SIG_IGN: exec resets handlers to the default, so COMMAND still stops.
        signal.signal(signum, _ignore)
    registry = Registry(Path(home))
    code = wait_recording_jobs(subprocess.Popen(command), registry, run_id)
    try:
        slurm.record_jobs(registry, registry.load(run_id))  # submitted just before the end
        registry.update(run_id, exit_code=code, ended=time.time())
    except (FileNotFoundError, UnknownRun):
        pass  # the run was deleted from the registry meanwhile
    print(f"rlbus run {run_id}: the run ended with exit code {code}", flush=True)
    return code if code >= 0 else 128 - code


def wait_recording_jobs(child: subprocess.Popen, registry: Registry, run_id: str) -> int:
    """Wait for ``child``; meanwhile, for a SLURM run, record its job ids once they are there."""
    try:
        record = registry.load(run_id)
    except UnknownRun:
        return child.wait()
    while record.slurm and not record.slurm_jobs:
        try:
            return child.wait(JOBS_POLL_S)
        except subprocess.TimeoutExpired:
            record = slurm.record_jobs(registry, record)
    return child.wait()


def _ignore(_signum: int, _frame: object) -> None:
    pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
