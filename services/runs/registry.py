"""The registry of runs on this machine: one JSON file per run under ``$RLBUS_HOME/runs/``.

No processes here: whether a run's process is alive is asked of :mod:`.process` and passed
in, so the status rules are plain functions. A run's status follows from what was recorded:

- an exit code was recorded (the detached wrapper writes it when ``rlbus rl`` ends):
  ``stopped`` if a stop was asked for, else ``completed`` (0) or ``failed``;
- none was, and the process is alive: ``running`` (``stopping`` once a stop was asked for);
- none was, and the process is gone (killed with -9, the machine rebooted): ``stopped`` if a
  stop was asked for, else how the run ended as far as it can be told without an exit code
  (``failed`` for local runs; for a SLURM run, what the controller says of its jobs:
  :mod:`.slurm`). A pid that was reused after a reboot is no proof of life: :mod:`.process`
  compares the process's start time with the recorded one.

Every write replaces the file atomically (temp file + ``os.replace``) under a lock, so a reader
never sees half a record and the wrapper's exit record and ``rlbus stop`` do not lose each other's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import json
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOME_ENV = "RLBUS_HOME"
RUNNING, STOPPING, COMPLETED, FAILED, STOPPED = "running", "stopping", "completed", "failed", "stopped"
ACTIVE = (RUNNING, STOPPING)
"""Statuses of a run whose processes may still be alive."""
NUM_ID_BYTES = 4
"""Run ids are this many random bytes as hex: 8 characters."""


def rlbus_home(environ: Mapping[str, str] = os.environ) -> Path:
    """``$RLBUS_HOME``, default ``~/.rlbus``: the registry and local models."""
    return Path(environ.get(HOME_ENV) or Path.home() / ".rlbus").expanduser()


@dataclass
class RunRecord:
    """What the registry knows of one run."""

    id: str
    name: str
    model: str
    output_dir: str
    """Absolute run folder."""
    console: str
    """File that receives the detached launcher's stdout and stderr."""
    argv: list[str]
    """Arguments of ``rlbus run`` (and so of ``rlbus rl``), relative to ``cwd``."""
    cwd: str
    host: str
    started: float
    """UNIX seconds."""
    envs: list[str] = field(default_factory=list)
    max_steps: int | None = None
    pid: int | None = None
    """The detached wrapper, leader of the run's process group."""
    pid_start: int | None = None
    """The wrapper's start time in clock ticks since boot (``/proc/<pid>/stat``), to tell a reused pid."""
    boot_id: str | None = None
    stop_requested: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    """Exit code of ``rlbus rl`` (negative: killed by that signal), recorded by the wrapper."""
    slurm: bool = False
    """Submitted as SLURM job arrays (``--slurm``): the wrapper follows them from this host."""
    slurm_jobs: dict[str, str] = field(default_factory=dict)
    """Service -> array job id, recorded once the arrays are submitted (:mod:`.slurm`)."""


def status_of(record: RunRecord, alive: bool, ended_as: str = FAILED) -> str:
    """The run's status from its record and whether its processes are alive (see the module docstring);
    ``ended_as``: what a run that ended without an exit record is taken to have done."""
    if record.exit_code is not None:
        if record.stop_requested is not None:
            return STOPPED
        return COMPLETED if record.exit_code == 0 else FAILED
    if alive:
        return STOPPING if record.stop_requested is not None else RUNNING
    return STOPPED if record.stop_requested is not None else ended_as


class UnknownRun(ValueError):
    """No run has this id; the message suggests the closest one."""


class Registry:
    """The run records under ``<home>/runs``."""

    def __init__(self, home: Path) -> None:
        self.folder = home / "runs"

    def path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.json"

    def new_id(self) -> str:
        """A fresh id no recorded run has."""
        while True:
            run_id = secrets.token_hex(NUM_ID_BYTES)
            if not self.path(run_id).exists():
                return run_id

    def save(self, record: RunRecord) -> None:
        with self._locked():
            self._write(record)

    def load(self, run_id: str) -> RunRecord:
        """The run ``run_id`` (or the only one whose id starts with it); :class:`UnknownRun` if none."""
        if self.path(run_id).is_file():
            return _read(self.path(run_id))
        ids = self.ids()
        matches = [known for known in ids if known.startswith(run_id)] if run_id else []
        if len(matches) == 1:
            return _read(self.path(matches[0]))
        if len(matches) > 1:
            raise UnknownRun(f"run id {run_id!r} is ambiguous: it starts {', '.join(sorted(matches))}")
        raise UnknownRun(f"no run {run_id!r}{closest_hint(run_id, ids)}")

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.is_dir() else []

    def records(self) -> list[RunRecord]:
        """Every readable record, oldest first (a file that does not parse is skipped)."""
        found = []
        for run_id in self.ids():
            try:
                found.append(_read(self.path(run_id)))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(found, key=lambda r: r.started)

    def update(self, run_id: str, **changes: Any) -> RunRecord:
        """Set ``changes`` on the stored record (read, change, replace, under the lock)."""
        with self._locked():
            record = dataclasses.replace(_read(self.path(run_id)), **changes)
            self._write(record)
        return record

    def remove(self, run_id: str) -> None:
        with self._locked():
            self.path(run_id).unlink(missing_ok=True)

    def _write(self, record: RunRecord) -> None:
        write_atomically(self.path(record.id), json.dumps(dataclasses.asdict(record), indent=1) + "\n")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def closest_hint(run_id: str, ids: list[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest of ``ids``, or where to look when none is close."""
    close = difflib.get_close_matches(run_id, ids, n=1, cutoff=0.5)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return "; 'rlbus list' shows every run" if ids else "; no runs are recorded yet ('rlbus run @ config.toml')"


def _read(path: Path) -> RunRecord:
    values = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(RunRecord)}
    return RunRecord(**{k: v for k, v in values.items() if k in known})
