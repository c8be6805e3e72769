"""Audit trails: what each service saw happen, written where a test can check it against the others.

The orchestrator's journal says what it accepted and built, but a test of the journal cannot also
take the journal as its witness. With ``RLBUS_AUDIT_DIR`` set, two other services keep their own
account, one JSON object per line, in ``<RLBUS_AUDIT_DIR>/<name>.jsonl``:

- ``env-worker-<worker_id>.jsonl``: each answer the worker got for a result it held,
  ``{"time", "worker_id", "task_id", "is_eval", "accepted", "reason"}`` (written on receipt);
- ``trainer-<trainer_id>.jsonl``: each step applied, ``{"time", "trainer_id", "step", "ok",
  "task_ids"}`` with the task ids of the groups the step's batch was built from (rank 0; written
  once the step is checkpointed, before its ``BatchAck``).

``tests/integration/chaos_run.py`` sets the variable for every service it starts. Unset (the
default) nothing is written. Each record is one ``write`` on a file opened for appending: a
killed process leaves whole lines, at most the last one cut short, which readers skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlbus.durable import write_all

ENV_VAR = "RLBUS_AUDIT_DIR"


class AuditLog:
    """Appends records to one audit file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls, name: str) -> AuditLog | None:
        """The audit file ``name`` under ``$RLBUS_AUDIT_DIR``; None when the variable is unset."""
        folder = os.environ.get(ENV_VAR)
        if not folder:
            return None
        if "/" in name or name.startswith("."):
            raise ValueError(f"audit file name {name!r} must be a plain file name")
        return cls(Path(folder) / f"{name}.jsonl")

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            write_all(fd, line)
        finally:
            os.close(fd)


def read_audit(path: Path) -> list[dict[str, Any]]:
    """The records of one audit file; a line cut short by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
