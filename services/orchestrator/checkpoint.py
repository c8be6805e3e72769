"""The orchestrator's progress checkpoint: small JSON files written atomically.

``<output_dir>/checkpoints/orchestrator/step_<N>.json`` holds the state after
batches ``1 .. N`` were built (written once the trainer acknowledged step N): counters, the sampler position and the
examples already drawn but not yet in a batch (``pending``, issued first on
resume so no drawn problem is skipped). A file is written to a temporary
name, flushed to disk and renamed, so a crash leaves either the old or the
new file, never half of one.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import msgspec
from loguru import logger

from rlbus.durable import fsync_dir
from rlbus.services.orchestrator.sampler import Draw, SamplerState

FORMAT_VERSION = 1
_FILE = re.compile(r"step_(\d+)\.json")


class ProgressState(msgspec.Struct, kw_only=True):
    """Where a run stands, as far as the orchestrator is concerned."""

    version: int = FORMAT_VERSION
    step: int = 0
    """Steps whose batches were built (the next one is ``step + 1``)."""
    total_samples: int = 0
    """Rollouts packed into batches so far."""
    total_tokens: int = 0
    """Tokens packed into batches so far."""
    total_problems: int = 0
    """Groups (examples) that went into batches so far."""
    sampler: SamplerState = msgspec.field(default_factory=SamplerState)
    pending: list[Draw] = []
    """Examples drawn whose rollouts were not in a batch of steps ``1 .. step`` yet."""
    saved_at: float = 0.0


class ProgressStore:
    """Saves and finds progress files in one folder, keeping the newest ``keep_last``."""

    def __init__(self, folder: Path, keep_last: int = 3) -> None:
        self.folder = Path(folder)
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step}.json"

    def steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _FILE.fullmatch(p.name)))

    def save(self, state: ProgressState) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = msgspec.structs.replace(state, saved_at=time.time())
        path, tmp = self.path(state.step), self.folder / f".step_{state.step}.json.tmp"
        with open(tmp, "wb") as handle:
            handle.write(msgspec.json.encode(state))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(self.folder)
        self._prune()
        return path

    def load(self, resume_step: int | None) -> ProgressState | None:
        """The state saved at ``resume_step`` (-1: the latest), or None when not resuming."""
        if resume_step is None:
            return None
        steps = self.steps()
        if resume_step == -1:
            if not steps:
                logger.warning("resume_step = -1 but {} holds no progress yet: starting fresh", self.folder)
                return None
            resume_step = steps[-1]
        if resume_step not in steps:
            raise ValueError(f"no orchestrator progress for step {resume_step} in {self.folder}; saved steps: {steps}")
        state = msgspec.json.decode(self.path(resume_step).read_bytes(), type=ProgressState)
        if state.version != FORMAT_VERSION:
            raise ValueError(f"{self.path(resume_step)} has format version {state.version}, expected {FORMAT_VERSION}")
        return state

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            self.path(step).unlink(missing_ok=True)
