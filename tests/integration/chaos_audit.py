"""Exactly-once audit of a chaos run, from witnesses other than the orchestrator's journal.

The journal is what a chaos run tests, so it cannot also be the witness. With ``RLBUS_AUDIT_DIR``
set (``rlbus.audit``; :class:`tests.integration.chaos_run.ChaosRun` sets it for every service),
two other services keep their own account:

- each env-worker, every answer it got for a result it held: the task ids the orchestrator told it
  were stored (``accepted``), or refused as a duplicate of a result it already stored;
- the trainer, every step it applied (after the checkpoint, before the ``BatchAck``) with the task
  ids of the groups its batch was built from (``TrainBatch.task_ids``).

The audit: every step 1..max_steps recorded exactly once (none twice, none skipped); every task
acknowledged to a worker is in exactly one recorded step, or dropped as stale, or still buffered
when the run ended. Only those last two excuses are read from the journal (its ``dropped`` and
``finished`` records), and they are counted in the table, so a journal that "drops" what it lost
shows up there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rlbus.audit import read_audit
from rlbus.services.orchestrator.journal import read_history


@dataclass
class Audit:
    """What the witnesses say about exactly-once training (see the module docstring)."""

    max_steps: int
    trained_steps: list[int]
    """Steps the trainer recorded (applied, or rejected and so used up), each once, ascending."""
    num_acked: int = 0
    """Training tasks the orchestrator told an env-worker it had stored."""
    duplicate_steps: list[int] = field(default_factory=list)
    """Steps the trainer recorded more than once."""
    skipped_steps: list[int] = field(default_factory=list)
    trained_twice: list[str] = field(default_factory=list)
    """Task ids in more than one recorded step."""
    lost: list[str] = field(default_factory=list)
    """Task ids acknowledged to a worker but in no step, not dropped as stale and not left over."""
    num_stale: int = 0
    num_left_over: int = 0
    num_trained_unwitnessed: int = 0
    """Trained task ids no worker recorded an answer for (its worker was killed before it could)."""

    @property
    def contiguous(self) -> bool:
        return self.trained_steps == list(range(1, self.max_steps + 1))

    @property
    def ok(self) -> bool:
        return (self.contiguous and self.num_acked > 0
                and not (self.duplicate_steps or self.skipped_steps or self.trained_twice or self.lost))  # fmt: skip


def trainer_records(audit_dir: Path) -> list[dict]:
    return [r for path in sorted(audit_dir.glob("trainer-*.jsonl")) for r in read_audit(path)]


def worker_records(audit_dir: Path) -> list[dict]:
    return [r for path in sorted(audit_dir.glob("env-worker-*.jsonl")) for r in read_audit(path)]


def acknowledged_task_ids(records: list[dict]) -> set[str]:
    """Training tasks the orchestrator said it stored: accepted, or refused as a duplicate (it had
    the result already: its ack was lost in a restart), unless some answer refused it for another
    reason (a copy of a task refused as stale, say, is then refused to its second worker as a duplicate)."""
    training = [r for r in records if not r["is_eval"]]
    accepted = {r["task_id"] for r in training if r["accepted"]}
    duplicates = {r["task_id"] for r in training if not r["accepted"] and r["reason"].startswith("duplicate")}
    refused = {r["task_id"] for r in training if not r["accepted"] and not r["reason"].startswith("duplicate")}
    return accepted | (duplicates - refused)


def audit(audit_dir: Path, journal: Path, max_steps: int) -> Audit:
    """Check the run's audit trails (see the module docstring); ``journal`` only names the groups
    dropped as stale and those left over at the end."""
    steps = trainer_records(audit_dir)
    step_counts = Counter(r["step"] for r in steps)
    # A step recorded twice is reported as such; its groups are counted once here.
    task_ids_of = {r["step"]: r["task_ids"] for r in steps}
    in_steps = Counter(t for task_ids in task_ids_of.values() for t in task_ids)
    acked = acknowledged_task_ids(worker_records(audit_dir))
    history = read_history(journal) if journal.exists() else []
    stale = {t for r in history if r["kind"] == "dropped" for t in r["task_ids"]}
    left = {t for r in history if r["kind"] == "finished" for t in r["task_ids"]}
    untrained = acked - set(in_steps)
    return Audit(
        max_steps=max_steps, trained_steps=sorted(step_counts), num_acked=len(acked),
        duplicate_steps=sorted(s for s, n in step_counts.items() if n > 1),
        skipped_steps=[s for s in range(1, max_steps + 1) if s not in step_counts],
        trained_twice=sorted(t for t, n in in_steps.items() if n > 1),
        lost=sorted(untrained - stale - left), num_stale=len(untrained & stale), num_left_over=len(untrained & left),
        num_trained_unwitnessed=len(set(in_steps) - acked),
    )  # fmt: skip
