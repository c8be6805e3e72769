"""One run folder as the dashboard sees it, read incrementally while the run writes it.

The dashboard reads the same files for a live run (the monitor's own ``output_dir``) and for
finished ones (``rlbus dashboard``): ``steps.jsonl`` (one row per step: the charts),
``metrics.jsonl`` (evaluations, which usually finish after their step's row was written),
``samples.jsonl`` and ``events.jsonl``. Each poll reads only what was appended since the last
one, whole lines only (the monitor flushes line by line; a line still being written waits for
the next poll). A file that shrank was replaced (a run started again in the folder): the run
is read again from the start under a new ``epoch``, so pages drop what they showed.

What a page already has is a :class:`RunCursor`; :meth:`RunFollower.delta` sends what is newer.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

from rlbus.run_files import EVENTS_FILE, METRICS_FILE, SAMPLES_FILE, STEPS_FILE

T = TypeVar("T")

MAX_SAMPLES = 2000
"""Sample rollouts kept per run (the latest); the page shows them per step."""
MAX_EVENTS = 300
"""Events kept per run (the latest)."""
MAX_TEXT_CHARS = 2000
"""Prompts and completions longer than this are cut for the page."""
SAMPLE_FIELDS = ("step", "env_id", "prompt", "completion", "answer", "reward", "advantage", "finish_reason",
                 "policy_step")  # fmt: skip
EVENT_FIELDS = ("time", "service", "replica_id", "level", "kind", "message")
ENV_REWARD = re.compile(r"^orchestrator/reward/(?P<env>[^/]+)/mean$")
EVAL_FIGURE = re.compile(r"^eval/.+/(avg|pass)@\d+$")
CONFIG_FILES = ("monitor.toml", "rl.toml", "sft.toml", "orchestrator.toml")
"""Resolved configs that name the run's model and max_steps, in order of preference."""


class Journal(Generic[T]):
    """Items in arrival order, each with a sequence number; the oldest fall off past ``maxlen``."""

    def __init__(self, maxlen: int | None = None) -> None:
        self.items: deque[T] = deque(maxlen=maxlen)
        self.end = 0
        """Sequence number of the next item."""

    def append(self, item: T) -> None:
        self.items.append(item)
        self.end += 1

    def since(self, seq: int) -> list[T]:
        """Items numbered ``seq`` and later (those still kept)."""
        start = self.end - len(self.items)
        return list(islice(self.items, max(0, seq - start), None))


class JsonlFollower:
    """Reads the whole lines appended to one JSONL file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read_new(self) -> tuple[list[dict[str, Any]], bool]:
        """(new objects, whether the file was replaced and is read again from its start)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return [], False
        replaced = size < self.offset
        if replaced:
            self.offset = 0
        if size == self.offset:
            return [], replaced
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read(size - self.offset)
        end = data.rfind(b"\n")
        if end < 0:
            return [], replaced
        self.offset += end + 1
        return list(_objects(data[: end + 1].splitlines())), replaced


def _objects(lines: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    for line in lines:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line cut by a crash: skipped, like rlbus.run_files.read_rows does
        if isinstance(row, dict):
            yield row


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RunCursor:
    """What a page already has of one run."""

    epoch: int
    points: int
    samples: int
    events: int


def run_settings(output_dir: Path) -> tuple[str | None, int | None]:
    """(model, max_steps) from the run's resolved configs under ``configs/``; None where none says."""
    for name in CONFIG_FILES:
        path = output_dir / "configs" / name
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
        model, max_steps = values.get("model"), values.get("max_steps")
        return (str(model) if model is not None else None, max_steps if isinstance(max_steps, int) else None)
    return None, None


class RunFollower:
    """The figures, samples and events of one run folder, kept up to date by :meth:`poll`."""

    def __init__(self, output_dir: Path, name: str, wanted: re.Pattern[str],
                 model: str | None = None, max_steps: int | None = None) -> None:  # fmt: skip
        self.output_dir, self.name, self.wanted = output_dir, name, wanted
        settings = run_settings(output_dir) if model is None or max_steps is None else (model, max_steps)
        self.model, self.max_steps = model or settings[0], max_steps or settings[1]
        self.epoch = 0
        self._reset()

    def _reset(self) -> None:
        self.files = {name: JsonlFollower(self.output_dir / name)
                      for name in (STEPS_FILE, METRICS_FILE, SAMPLES_FILE, EVENTS_FILE)}  # fmt: skip
        self.points: Journal[tuple[str, int, float]] = Journal()
        """(column, step, value); a step read again (a resumed run) replaces the earlier point on the page."""
        self.samples: Journal[dict[str, Any]] = Journal(MAX_SAMPLES)
        self.events: Journal[dict[str, Any]] = Journal(MAX_EVENTS)
        self.envs: set[str] = set()
        self.first_row: dict[str, Any] | None = None
        self.last_row: dict[str, Any] | None = None
        self.finished = False

    def poll(self) -> bool:
        """Read what the files gained; True when anything did."""
        batches = {name: follower.read_new() for name, follower in self.files.items()}
        if any(replaced for _, replaced in batches.values()):
            self.epoch += 1
            self._reset()
            batches = {name: follower.read_new() for name, follower in self.files.items()}
        for row in batches[STEPS_FILE][0]:
            self._add_step_row(row)
        for row in batches[METRICS_FILE][0]:
            self._add_metrics_row(row)
        for row in batches[SAMPLES_FILE][0]:
            self._add_sample(row)
        for row in batches[EVENTS_FILE][0]:
            self._add_event(row)
        return any(rows for rows, _ in batches.values())

    def _add_step_row(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        if not isinstance(step, int):
            return
        for key, value in row.items():
            if is_number(value) and self.wanted.match(key):
                self.points.append((key, step, float(value)))
            if (found := ENV_REWARD.match(key)) and found["env"] != "all":
                self.envs.add(found["env"])
        self.first_row = self.first_row or row
        if self.last_row is None or step >= self.last_row["step"]:
            self.last_row = row

    def _add_metrics_row(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        if not isinstance(step, int):
            return
        for key, value in row.items():
            if EVAL_FIGURE.match(key) and is_number(value):
                self.points.append((key, step, float(value)))

    def _add_sample(self, row: dict[str, Any]) -> None:
        if not isinstance(row.get("step"), int):
            return
        sample = {name: row.get(name) for name in SAMPLE_FIELDS}
        for name in ("prompt", "completion", "answer"):
            sample[name] = _text(sample[name])
        if isinstance(sample["env_id"], str):
            self.envs.add(sample["env_id"])
        self.samples.append(sample)

    def _add_event(self, row: dict[str, Any]) -> None:
        event = {name: row.get(name) for name in EVENT_FIELDS}
        if event["kind"] == "finished" and event["service"] == "orchestrator":
            self.finished = True
        self.events.append(event)

    def delta(self, cursor: RunCursor | None) -> tuple[dict[str, Any], RunCursor]:
        """What is newer than ``cursor`` (everything for None or a cursor of an earlier epoch)."""
        if cursor is None or cursor.epoch != self.epoch:
            cursor = RunCursor(self.epoch, 0, 0, 0)
            reset = True
        else:
            reset = False
        series: dict[str, list[list[float]]] = {}
        for key, step, value in self.points.since(cursor.points):
            series.setdefault(key, []).append([step, value])
        payload = {"name": self.name, "reset": reset, "overview": self.overview(), "series": series,
                   "samples": self.samples.since(cursor.samples), "events": self.events.since(cursor.events)}  # fmt: skip
        return payload, RunCursor(self.epoch, self.points.end, self.samples.end, self.events.end)

    @property
    def done(self) -> bool:
        """The orchestrator said it finished, or a run without one (SFT) reached ``max_steps``."""
        step = self.last_row["step"] if self.last_row else None
        return self.finished or (self.max_steps is not None and step is not None and step >= self.max_steps)

    def overview(self) -> dict[str, Any]:
        """Model, environments, step of max_steps, when it started, how long it has run, and an ETA."""
        last, first = self.last_row, self.first_row
        step = last["step"] if last else None
        started_at = _started_at(first)
        eta_s = None
        if last and first and self.max_steps and not self.done and step is not None:
            seconds_per_step = _seconds_per_step(first, last)
            if seconds_per_step is not None:
                eta_s = seconds_per_step * max(0, self.max_steps - step)
        return {
            "model": self.model, "envs": sorted(self.envs), "step": step, "max_steps": self.max_steps,
            "started_at": started_at, "last_update": last.get("time") if last else None,
            "elapsed_s": last.get("elapsed_s") if last else None, "eta_s": eta_s, "finished": self.done,
        }  # fmt: skip


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + " …"


def _started_at(row: dict[str, Any] | None) -> float | None:
    if row is None or not is_number(row.get("time")) or not is_number(row.get("elapsed_s")):
        return None
    return float(row["time"]) - float(row["elapsed_s"])


def _seconds_per_step(first: dict[str, Any], last: dict[str, Any]) -> float | None:
    """Seconds per step between the first and the last row read; from the start with one row."""
    if last["step"] > first["step"] and is_number(last.get("time")) and is_number(first.get("time")):
        return (float(last["time"]) - float(first["time"])) / (last["step"] - first["step"])
    if is_number(last.get("elapsed_s")) and last["step"] > 0:
        return float(last["elapsed_s"]) / last["step"]
    return None
