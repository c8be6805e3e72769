"""The orchestrator's journal: every accepted rollout and built step, written before it counts.

``<output_dir>/checkpoints/orchestrator/journal.jsonl`` holds one JSON object per line:

- ``{"kind": "accepted", "result": <RolloutResult>}``: a training result was accepted;
  written before its ``ResultAck`` is sent, so an env-worker only forgets a result
  the journal holds.
- ``{"kind": "built", "step": S, "task_ids": [...]}``: step ``S`` was built from these
  groups; written before any rank gets the batch.
- ``{"kind": "dropped", "reason": "stale", "task_ids": [...]}``: accepted groups that
  became too old to train on.
- ``{"kind": "acked", "step": S}``: the trainer acknowledged step ``S``.
- ``{"kind": "resumed", "step": K, "num_restored": n}``: an orchestrator started from
  progress ``K`` and put ``n`` journaled groups back into its buffer.
- ``{"kind": "finished", "task_ids": [...]}``: groups still buffered when the run ended.

Progress checkpoints (:mod:`rlbus.services.orchestrator.checkpoint`) only say where the run
stood at a checkpoint step; the journal holds what happened since. A restarted
orchestrator (``ckpt.resume_step = -1``) loads the latest progress ``K`` and replays the
journal: steps built after ``K`` are rebuilt at once from the same groups (the same
batches: building is deterministic), and the groups accepted but not built yet go back
into the buffer. No accepted rollout is lost, and every accepted task id stays known, so a result
resent by an env-worker whose ack was lost is recognised as a duplicate.

Each line is handed to the operating system before the message it records is sent, so
a killed orchestrator loses nothing; the file is also fsynced with every progress
checkpoint. A line cut off by a crash (the last one) is ignored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from loguru import logger

from rlbus.messages import RolloutResult


@dataclass
class Replay:
    """What a journal says about the run after progress step ``step``."""

    step: int
    results: list[RolloutResult] = field(default_factory=list)
    """Accepted groups not in a batch of steps ``1 .. step``: those of later built steps first
    (in step order), then the ones not built yet (in arrival order)."""
    accepted_task_ids: set[str] = field(default_factory=set)
    """Every task id ever accepted (results resent later are duplicates)."""
    built_after: dict[int, list[str]] = field(default_factory=dict)
    """Steps built after ``step`` -> their task ids: rebuilt at once from the same groups, so a
    trainer that got one of them before the restart trains (or acknowledges) exactly that batch."""


class Journal:
    """Append-only record of accepted groups and built steps (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle: Any = None

    def open(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: each write reaches the OS at once, so a killed process loses no line.
        self._handle = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open for the run, closed by close()
        return self

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def discard(self) -> None:
        """Move an old journal aside (a fresh start, or a resume from an older step than its end)."""
        if self.path.exists():
            aside = self.path.with_name(f"{self.path.name}.{int(time.time())}.discarded")
            self.path.rename(aside)
            logger.info("journal of an earlier run moved to {}", aside)

    def sync(self) -> None:
        """Force the journal to disk (with each progress checkpoint): survives a machine crash too."""
        if self._handle is not None:
            os.fsync(self._handle.fileno())

    # ---------------------------------------------------------------- records

    def accepted(self, result: RolloutResult) -> None:
        self._write({"kind": "accepted", "time": time.time(), "result": result})

    def built(self, step: int, task_ids: list[str]) -> None:
        self._write({"kind": "built", "time": time.time(), "step": step, "task_ids": task_ids})

    def dropped(self, reason: str, task_ids: list[str]) -> None:
        self._write({"kind": "dropped", "time": time.time(), "reason": reason, "task_ids": task_ids})

    def acked(self, step: int) -> None:
        self._write({"kind": "acked", "time": time.time(), "step": step})

    def resumed(self, step: int, num_restored: int) -> None:
        self._write({"kind": "resumed", "time": time.time(), "step": step, "num_restored": num_restored,
                     "pid": os.getpid()})  # fmt: skip

    def finished(self, task_ids: list[str]) -> None:
        self._write({"kind": "finished", "time": time.time(), "task_ids": task_ids})

    def _write(self, record: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.write(msgspec.json.encode(record) + b"\n")

    # ----------------------------------------------------------------- replay

    def replay(self, step: int) -> Replay:
        """What happened after progress ``step``, from the journal on disk."""
        return replay_records(read_records(self.path), step)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The journal's records; a line cut off by a crash is skipped with a warning."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(msgspec.json.decode(line))
        except msgspec.DecodeError:
            logger.warning("{} line {}: not a complete record (cut off by a crash?); skipped", path, number)
    return records


def replay_records(records: Iterable[dict[str, Any]], step: int) -> Replay:
    accepted: dict[str, dict[str, Any]] = {}
    built: dict[int, list[str]] = {}
    gone: set[str] = set()
    for record in records:
        kind = record.get("kind")
        if kind == "accepted":
            accepted.setdefault(record["result"]["task_id"], record["result"])
        elif kind == "built":
            built[int(record["step"])] = list(record["task_ids"])  # a rebuilt step replaces the first
        elif kind == "dropped":
            gone.update(record["task_ids"])
    consumed = {task_id for s, task_ids in built.items() if s <= step for task_id in task_ids}
    later = [task_id for s in sorted(built) if s > step for task_id in built[s]]
    order = list(dict.fromkeys([*later, *accepted]))  # later steps' groups first, then arrival order
    keep = [t for t in order if t in accepted and t not in consumed and t not in gone]
    results = [msgspec.convert(accepted[t], RolloutResult) for t in keep]
    return Replay(step=step, results=results, accepted_task_ids=set(accepted),
                  built_after={s: task_ids for s, task_ids in sorted(built.items()) if s > step})  # fmt: skip
