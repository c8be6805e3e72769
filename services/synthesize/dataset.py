"""The dataset files of ``rlbus synthesize``: rows, their keys, and appending that survives a kill.

A row is one rollout: ``messages`` (and ``tools`` when the environment offered
any), what ``rlbus sft`` trains on, plus ``reward``, ``reward_breakdown``,
``metrics``, ``is_truncated``, ``answer`` and where it came from (``env_id``,
``env_args``, ``example_id``, ``rollout_index``, ``seed``, ``model``). Its key is
(env id, env args, example index, rollout index, seed): a rerun skips every key
already in the output file or in the rejects file (rows below ``min_reward``,
kept so that they are not rolled out again), so it continues where a stopped
run ended and never writes a rollout twice.

Each row is one ``write`` of its line and newline, flushed at once. A process
killed mid-write leaves at most a last line without its newline: reopening
keeps it when it is a whole row (only the newline was lost) and cuts it off
otherwise, with a warning. Any other line that is not a row is an error: the
file is not one this command wrote.
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from loguru import logger

from rlbus.errors import UserError
from rlbus.messages import Rollout
from rlbus.services.env_worker.rollout import Transcript

KEY_FIELDS = ("env_id", "env_args", "example_id", "rollout_index", "seed")
"""The row fields that make its key."""
RowKey = str


def row_key(env_id: str, env_args: dict[str, Any], example_id: int, rollout_index: int, seed: int) -> RowKey:
    """The key of one rollout; the same for equal arguments, whatever their order."""
    return json.dumps([env_id, env_args, example_id, rollout_index, seed], sort_keys=True, separators=(",", ":"))


def key_of_row(row: dict[str, Any]) -> RowKey:
    """The key of a row read back; ValueError naming the missing fields."""
    missing = [name for name in KEY_FIELDS if name not in row]
    if missing:
        raise ValueError(f"a row without {missing}")
    return row_key(*(row[name] for name in KEY_FIELDS))


@dataclass(frozen=True)
class RowOrigin:
    """Where a rollout comes from: everything in a row but what the rollout produced."""

    env_id: str
    env_args: dict[str, Any]
    example_id: int
    rollout_index: int
    seed: int
    model: str

    @property
    def key(self) -> RowKey:
        return row_key(self.env_id, self.env_args, self.example_id, self.rollout_index, self.seed)


def build_row(origin: RowOrigin, rollout: Rollout, transcript: Transcript) -> dict[str, Any]:
    """The dataset row of a rollout that did not error."""
    row: dict[str, Any] = {"messages": transcript.messages}
    if transcript.tools:
        row["tools"] = transcript.tools
    row |= {
        "reward": rollout.reward, "reward_breakdown": rollout.reward_breakdown, "metrics": rollout.metrics,
        "is_truncated": rollout.is_truncated, "env_id": origin.env_id, "env_args": origin.env_args,
        "example_id": origin.example_id, "rollout_index": origin.rollout_index, "seed": origin.seed,
        "model": origin.model,
    }  # fmt: skip
    if rollout.answer is not None:
        row["answer"] = rollout.answer
    return row


class RowFile:
    """One JSONL file of rows, opened for appending after its keys were read (and a torn last line mended)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: set[RowKey] = set()
        self.num_rows = 0
        self._handle: IO[str] | None = None

    def open(self) -> RowFile:
        """Read the keys already written, mend a torn last line, lock the file and open it for appending."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"{self.path} is being written by another rlbus synthesize; wait for it to end, "
                            "or pick another --output") from None  # fmt: skip
        self._handle = handle
        self._read_keys()
        return self

    def _read_keys(self) -> None:
        end, torn = 0, b""
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith(b"\n"):
                    torn = line
                    break
                end += len(line)
                if line.strip():
                    self._add(self._parse(line, number))
        if torn:
            self._mend(torn, end)

    def _parse(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")  # noqa: TRY004 - one message for both
            key_of_row(row)
        except ValueError as exc:
            raise UserError(f"{self.path}:{number} is not a row of rlbus synthesize ({exc}): pick another --output, "
                            "or move this file away") from None  # fmt: skip
        return row

    def _add(self, row: dict[str, Any]) -> None:
        key = key_of_row(row)
        if key in self.keys:
            logger.warning("{} holds the rollout {} twice", self.path, key)
        self.keys.add(key)
        self.num_rows += 1

    def _mend(self, torn: bytes, end: int) -> None:
        """A last line without its newline: a whole row lost only its newline; anything else is cut off."""
        try:
            row = json.loads(torn)
        except ValueError:
            row = None
        assert self._handle is not None
        if isinstance(row, dict) and all(name in row for name in KEY_FIELDS):
            self._handle.write("\n")
            self._handle.flush()
            self._add(row)
            logger.warning("{}: the last row had no newline (a run stopped while writing it): kept it", self.path)
            return
        self._handle.truncate(end)
        logger.warning("{}: cut off a partly written last line ({} bytes; a run stopped while writing it): "
                       "that rollout runs again", self.path, len(torn))  # fmt: skip

    def append(self, key: RowKey, row: dict[str, Any]) -> None:
        """Write ``row`` as one line, flushed (one write: a kill leaves a line torn at worst, never two mixed)."""
        assert self._handle is not None, "open() first"
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.keys.add(key)
        self.num_rows += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class Dataset:
    """The output file (rows at or above ``min_reward``) and the rejects file (rows below it)."""

    def __init__(self, output: Path, rejects: Path, min_reward: float | None) -> None:
        self.accepted, self.rejected = RowFile(output), RowFile(rejects)
        self.min_reward = min_reward

    def open(self) -> Dataset:
        self.accepted.open()
        try:
            if self.rejected.path.exists() or self.min_reward is not None:
                self.rejected.open()
        except BaseException:
            self.accepted.close()
            raise
        return self

    def is_done(self, key: RowKey) -> bool:
        return key in self.accepted.keys or key in self.rejected.keys

    @property
    def num_done(self) -> int:
        return len(self.accepted.keys | self.rejected.keys)

    def add(self, key: RowKey, row: dict[str, Any]) -> bool:
        """Write ``row`` to the output (True) or, below ``min_reward``, to the rejects file (False)."""
        if self.min_reward is not None and row["reward"] < self.min_reward:
            self.rejected.append(key, row)
            return False
        self.accepted.append(key, row)
        return True

    def close(self) -> None:
        self.accepted.close()
        self.rejected.close()
