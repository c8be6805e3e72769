"""The SLURM commands rlbus uses, and parsing of their answers (no decisions here).

Everything goes through the controller (``sbatch``, ``squeue``, ``scontrol``,
``scancel``, ``srun``): nothing assumes a filesystem shared with the nodes.
``squeue`` rather than ``sacct`` because many clusters (and the CI one) have no
accounting database; ``squeue -t all`` still lists a finished task for
``MinJobAge`` seconds (300 by default), long enough to see how it ended.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO

TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
    "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED",
})  # fmt: skip
"""States a task never leaves (REQUEUED and the like are not here: the task comes back)."""
QUEUE_FORMAT = "%i|%A|%K|%T|%N|%F"
"""Job id as shown, own job id, array task id(s), state, nodes, array job id."""
COMMAND_TIMEOUT_S = 60.0


class SlurmError(RuntimeError):
    """A SLURM command failed; the message has its command line and stderr."""


@dataclass(frozen=True)
class TaskState:
    """One array task as the controller reports it."""

    array_job_id: str
    task_id: int
    job_id: str
    """The task's own job id (what ``srun --jobid`` and ``scontrol show job`` take); for a pending
    task not yet split off its array, the array's id."""
    state: str
    """``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``, ..."""
    node: str
    """Node name, empty while pending."""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def parse_queue(text: str) -> list[TaskState]:
    """Rows of ``squeue -h -o QUEUE_FORMAT``; a pending array range becomes one row per task."""
    tasks = []
    for line in text.splitlines():
        if not line.strip():
            continue
        _shown, job_id, task_ids, state, node, array_id = line.strip().split("|")
        if task_ids in ("N/A", ""):  # not an array job
            tasks.append(TaskState(job_id, 0, job_id, state.split()[0], node))
            continue
        for task_id in expand_task_ids(task_ids):
            tasks.append(TaskState(array_id, task_id, job_id, state.split()[0], node if state == "RUNNING" else ""))
    return tasks


def expand_task_ids(text: str) -> list[int]:
    """``"0-2,5%4"`` -> [0, 1, 2, 5] (``%N`` limits how many run at once)."""
    ids: list[int] = []
    for part in text.split("%")[0].split(","):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def parse_exit_code(show_job: str) -> int | None:
    """From ``scontrol show job``: the exit code, or minus the signal that killed the task."""
    match = re.search(r"\bExitCode=(\d+):(\d+)", show_job)
    if match is None:
        return None
    code, signum = int(match.group(1)), int(match.group(2))
    return -signum if signum else code


def parse_node_address(show_node: str) -> str | None:
    match = re.search(r"\bNodeAddr=(\S+)", show_node)
    return match.group(1) if match else None


def expand_output_pattern(pattern: str, job_name: str, array_job_id: str, task_id: int, job_id: str,
                          node: str) -> str:  # fmt: skip
    """The path ``--output=pattern`` names for one task (the filename patterns of ``man sbatch``)."""
    values = {"x": job_name, "A": array_job_id, "a": str(task_id), "j": job_id, "J": job_id, "N": node,
              "u": os.environ.get("USER", ""), "%": "%"}  # fmt: skip
    return re.sub(r"%(\d*)([xAajJNu%])", lambda m: values[m.group(2)].zfill(int(m.group(1) or 0)), pattern)


class SlurmCtl:
    """Runs SLURM's client commands (found on PATH; the cluster from ``SLURM_CONF`` or the default)."""

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        try:
            result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                                    timeout=COMMAND_TIMEOUT_S, check=False)  # fmt: skip
        except FileNotFoundError:
            raise SlurmError(f"{argv[0]} not found: is this a SLURM login node (slurm-client installed)?") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{' '.join(argv)} did not answer within {COMMAND_TIMEOUT_S:g}s") from None
        if result.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} failed (exit {result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, args: Sequence[str], script: str) -> str:
        """Submit ``script`` (read by sbatch from stdin); the job id."""
        return self.run(["sbatch", "--parsable", *args], stdin=script).strip().split(";")[0]

    def tasks(self, array_job_ids: Iterable[str]) -> list[TaskState]:
        """Every task of the given arrays that the controller still knows, finished ones included."""
        ids = ",".join(array_job_ids)
        return parse_queue(self.run(["squeue", "-h", "-t", "all", "-j", ids, "-o", QUEUE_FORMAT]))

    def exit_code(self, job_id: str) -> int | None:
        try:
            return parse_exit_code(self.run(["scontrol", "show", "job", "-o", job_id]))
        except SlurmError:
            return None  # already purged from the controller

    def node_address(self, node: str) -> str:
        """Where other nodes reach ``node`` (its ``NodeAddr``: often, but not always, its name)."""
        return parse_node_address(self.run(["scontrol", "show", "node", "-o", node])) or node

    def cancel(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            self.run(["scancel", *ids])

    def follow_output(self, job_id: str, path: str, errors: IO[bytes]) -> subprocess.Popen:
        """``tail -F`` of a file on the task's node, its lines coming back through SLURM's own I/O
        forwarding (an extra step sharing the task's resources: ``--overlap``). srun's own messages
        go to ``errors``: they end every such step ("STEP CANCELLED" when the task ends)."""
        argv = ["srun", f"--jobid={job_id}", "--overlap", "--ntasks=1", "--quiet", "--input=none",
                "tail", "-n", "+1", "-F", path]  # fmt: skip
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                start_new_session=True)  # fmt: skip
