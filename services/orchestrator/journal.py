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

Durability. Each record is written whole (a short write is completed; a write that fails
midway is cut back off) before the message it records is sent, and ``accepted`` and ``built``
records are also forced to disk first: the ``ResultAck`` makes a worker forget its result, and
a built batch may be trained. A line cut off by a crash (the last one) is cut off when the
journal is opened again, so the next record starts on a line of its own.

Compaction. Once the progress of step ``S`` is saved, :meth:`Journal.compact` rewrites the
journal to what a replay after ``S`` needs: the accepted groups not in a step ``<= S``, the
``built`` records of steps after ``S``, then one ``{"kind": "known", "task_ids": [...]}`` record
(ids of the groups trained or dropped, a few bytes each: a resent result stays a duplicate). The
file is written aside, forced to disk and renamed over the journal, so a crash leaves the old or
the new journal whole. Records replay does not read (``acked``, ``resumed``, ``finished``, and
any kind added later) are not carried over. The replaced file stays as ``journal.upto_<S>_<ns>.jsonl`` for audits
(:func:`read_history`); no restart reads it, and it may be deleted.

Replay never fails: a line that does not decode, or a record that does not have the shape of its
kind (a NaN written as ``null`` where a number belongs), is skipped and counted, and a warning
names its line and what is wrong.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
from loguru import logger

from rlbus.durable import fsync_dir, write_all
from rlbus.messages import RolloutResult

TAIL_CHUNK = 1 << 16  # bytes read at a time, backwards, to find the last complete line


@dataclass
class Replay:
    """What a journal says about the run after progress step ``step``."""

    step: int
    results: list[RolloutResult] = field(default_factory=list)
    """Accepted groups not in a batch of steps ``1 .. step``: those of later built steps first
    (in step order), then the ones not built yet (in arrival order)."""
    accepted_task_ids: set[str] = field(default_factory=set)
    """Every task id ever accepted (results resent later are duplicates), except those of groups
    whose record could not be read back: a resent copy of one of those is judged afresh."""
    built_after: dict[int, list[str]] = field(default_factory=dict)
    """Steps built after ``step`` -> their task ids: rebuilt at once from the same groups, so a
    trainer that got one of them before the restart trains (or acknowledges) exactly that batch."""
    num_skipped: int = 0
    """Lines skipped because they did not decode or validate (each one logged)."""


class Journal:
    """Append-only record of accepted groups and built steps (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._size = 0
        """Bytes of complete records in the file: where a failed write is cut back to."""

    def open(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        # Unbuffered: each write reaches the OS at once, so a killed process loses no line.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size
        return self

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Move an old journal and its segments aside (a fresh start, or a resume from an older
        step than its end)."""
        stamp = int(time.time())
        for path in [*self.segments(), self.path]:
            if path.exists():
                aside = path.with_name(f"{path.name}.{stamp}.discarded")
                path.rename(aside)
                logger.info("journal of an earlier run moved to {}", aside)

    def sync(self) -> None:
        """Force the journal to disk (with each progress checkpoint): survives a machine crash too."""
        if self._fd is not None:
            os.fsync(self._fd)

    def segments(self) -> list[Path]:
        """Journals replaced by compactions, oldest first (kept for audits, never replayed)."""
        found = self.path.parent.glob(f"{self.path.stem}.upto_*{self.path.suffix}")
        return sorted(found, key=lambda p: p.name)

    # ---------------------------------------------------------------- records

    def accepted(self, result: RolloutResult) -> None:
        self._write({"kind": "accepted", "time": time.time(), "result": result}, durable=True)

    def built(self, step: int, task_ids: list[str]) -> None:
        self._write({"kind": "built", "time": time.time(), "step": step, "task_ids": task_ids}, durable=True)

    def dropped(self, reason: str, task_ids: list[str]) -> None:
        self._write({"kind": "dropped", "time": time.time(), "reason": reason, "task_ids": task_ids})

    def acked(self, step: int) -> None:
        self._write({"kind": "acked", "time": time.time(), "step": step})

    def resumed(self, step: int, num_restored: int) -> None:
        self._write({"kind": "resumed", "time": time.time(), "step": step, "num_restored": num_restored,
                     "pid": os.getpid()})  # fmt: skip

    def finished(self, task_ids: list[str]) -> None:
        self._write({"kind": "finished", "time": time.time(), "task_ids": task_ids})

    def _write(self, record: dict[str, Any], durable: bool = False) -> None:
        """Append one whole line; ``durable``: on disk before returning (the caller acknowledges it)."""
        if self._fd is None:
            return
        data = msgspec.json.encode(record) + b"\n"
        try:
            write_all(self._fd, data)
        except BaseException:
            # Half a record would swallow the next one: cut it off before anything else is written.
            os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)
        if durable:
            os.fdatasync(self._fd)

    # ------------------------------------------------------ replay, compaction

    def replay(self, step: int) -> Replay:
        """What happened after progress ``step``, from the journal on disk."""
        if not self.path.exists():
            return Replay(step=step)
        with open(self.path, "rb") as handle:
            return _Scan(handle, str(self.path)).replay(step)

    def compact(self, step: int) -> None:
        """Rewrite the journal to what a replay after progress ``step`` needs (see the module
        docstring); call it once that progress is saved. The old file is kept as a segment."""
        if self._fd is None:
            return
        self.sync()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        segment = self.path.with_name(f"{self.path.stem}.upto_{step:09d}_{time.time_ns()}{self.path.suffix}")
        try:
            with open(self.path, "rb") as handle, open(tmp, "wb") as out:
                num_kept = _Scan(handle, str(self.path)).write_compacted(step, out)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            # The journal is whole as it is: go on appending to it, the next checkpoint tries again.
            logger.error("journal not compacted at step {} ({}); it keeps growing until a compaction works",
                         step, exc)  # fmt: skip
            tmp.unlink(missing_ok=True)
            return
        try:
            os.link(self.path, segment)  # the full history stays readable; restarts never read it
        except OSError as exc:
            logger.warning("journal records up to step {} not kept for audits (no hard link: {})", step, exc)
        before = self._size
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self.close()
        self.open()
        logger.info("journal compacted at step {}: {} -> {} bytes ({} group(s) kept)", step, before, self._size,
                    num_kept)  # fmt: skip


def repair_torn_tail(path: Path) -> int:
    """Cut off a last line without its newline (a write cut off by a crash); the bytes removed."""
    if not path.exists():
        return 0
    with open(path, "r+b") as handle:
        size = end = handle.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - TAIL_CHUNK)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return 0
        handle.truncate(end)
        handle.flush()
        os.fsync(handle.fileno())
    logger.warning("{}: 1 torn record ({} bytes, cut off by a crash) removed from the end", path, size - end)
    return size - end


class _ResultRef(msgspec.Struct):
    task_id: str


class _Record(msgspec.Struct):
    """What a scan reads of every record; the body of a result is only decoded when replayed."""

    kind: str
    step: int | None = None
    task_ids: list[str] | None = None
    result: _ResultRef | None = None


class _Accepted(msgspec.Struct):
    result: RolloutResult


_REQUIRED = {"accepted": ("result",), "built": ("step", "task_ids"), "dropped": ("task_ids",),
             "known": ("task_ids",)}  # fmt: skip
_RECORD = msgspec.json.Decoder(_Record)
_ACCEPTED = msgspec.json.Decoder(_Accepted)


class _Scan:
    """One pass over a journal: ids, steps and where each accepted group's line is (line number,
    offset, length), so that only the groups still needed are read again and decoded."""

    def __init__(self, handle: IO[bytes], name: str) -> None:
        self.handle, self.name = handle, name
        self.accepted: dict[str, tuple[int, int, int]] = {}
        self.built: dict[int, list[str]] = {}
        self.gone: set[str] = set()
        self.known: set[str] = set()
        self.num_skipped = 0
        offset = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                self._add(number, offset, line)
            offset += len(line)

    def _add(self, number: int, offset: int, line: bytes) -> None:
        try:
            record = _RECORD.decode(line)
            missing = [name for name in _REQUIRED.get(record.kind, ()) if getattr(record, name) is None]
            if missing:
                raise msgspec.ValidationError(f"a {record.kind!r} record without {' and '.join(missing)}")
        except msgspec.DecodeError as exc:  # ValidationError included
            self._skip(number, str(exc))
            return
        # The fields each kind needs were checked just above (_REQUIRED).
        if record.kind == "accepted" and record.result is not None:
            self.accepted.setdefault(record.result.task_id, (number, offset, len(line)))
        elif record.kind == "built" and record.step is not None and record.task_ids is not None:
            self.built[record.step] = record.task_ids  # a rebuilt step replaces the first
        elif record.kind == "dropped":
            self.gone.update(record.task_ids or [])
        elif record.kind == "known":
            self.known.update(record.task_ids or [])

    def _skip(self, number: int, why: str) -> None:
        self.num_skipped += 1
        logger.warning("{} line {}: record skipped on replay: {}", self.name, number, why)

    def kept(self, step: int) -> list[str]:
        """Ids of the groups a replay after ``step`` restores: later steps' groups first, then arrival order."""
        consumed = {task_id for s, task_ids in self.built.items() if s <= step for task_id in task_ids}
        later = [task_id for s in sorted(self.built) if s > step for task_id in self.built[s]]
        order = dict.fromkeys([*later, *self.accepted])
        return [t for t in order if t in self.accepted and t not in consumed and t not in self.gone]

    def built_after(self, step: int) -> dict[int, list[str]]:
        return {s: task_ids for s, task_ids in sorted(self.built.items()) if s > step}

    def line(self, task_id: str) -> bytes:
        _, offset, length = self.accepted[task_id]
        self.handle.seek(offset)
        return self.handle.read(length)

    def replay(self, step: int) -> Replay:
        results, unreadable = [], set()
        for task_id in self.kept(step):
            try:
                results.append(_ACCEPTED.decode(self.line(task_id)).result)
            except msgspec.DecodeError as exc:
                self._skip(self.accepted[task_id][0], f"accepted group {task_id!r} does not validate: {exc}")
                unreadable.add(task_id)
        if self.num_skipped:
            logger.warning("{}: {} record(s) skipped on replay", self.name, self.num_skipped)
        return Replay(step=step, results=results, accepted_task_ids=(set(self.accepted) | self.known) - unreadable,
                      built_after=self.built_after(step), num_skipped=self.num_skipped)  # fmt: skip

    def write_compacted(self, step: int, out: IO[bytes]) -> int:
        """Write what a replay after ``step`` needs to ``out``; the number of groups kept."""
        kept = self.kept(step)
        for task_id in sorted(kept, key=lambda t: self.accepted[t][1]):  # arrival order, as in the journal
            out.write(self.line(task_id).rstrip(b"\n") + b"\n")
        for s, task_ids in self.built_after(step).items():
            out.write(msgspec.json.encode({"kind": "built", "time": time.time(), "step": s,
                                           "task_ids": task_ids}) + b"\n")  # fmt: skip
        # Last: it also marks where the records carried over end (see read_history).
        known = (set(self.accepted) | self.known) - set(kept)
        out.write(msgspec.json.encode({"kind": "known", "time": time.time(), "step": step,
                                       "task_ids": sorted(known)}) + b"\n")  # fmt: skip
        return len(kept)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The journal's records as dicts (for audits and tests); a line that does not decode is skipped."""
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                logger.warning("{} line {}: not a complete record (cut off by a crash?); skipped", path, number)
    return records


def read_history(path: Path) -> list[dict[str, Any]]:
    """Every record of the run, from the compacted-away segments and the journal, each once: the
    records a compaction carried over (those before its ``known`` record) are left out."""
    records: list[dict[str, Any]] = []
    for file in [*Journal(path).segments(), path]:
        rows = read_records(file)
        marker = next((i for i, r in enumerate(rows) if isinstance(r, dict) and r.get("kind") == "known"), -1)
        records += rows[marker + 1 :]
    return records


def replay_records(records: Iterable[dict[str, Any]], step: int) -> Replay:
    """:meth:`Journal.replay` over records in memory."""
    data = b"".join(msgspec.json.encode(record) + b"\n" for record in records)
    return _Scan(io.BytesIO(data), "<records>").replay(step)
