"""Summarise an rlbus run from the monitor's ``<output_dir>/metrics.jsonl``.

Prints the mean reward over the first and the last ``--window`` RL steps (the
orchestrator's ``reward/all/mean``), their difference, the mean mismatch KL
(the trainer's ``mismatch_kl/mean``: how far the trainer's logprobs are from
those inference sampled with), the steps trained, and the wall time of each
phase given with ``--phase NAME=SECONDS``. ``./scripts/quickstart.sh`` ends with it.

usage: python scripts/summarize_run.py OUTPUT_DIR [--window 5] [--phase sft=120 ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

REWARD = ("orchestrator", "reward/all/mean")
MISMATCH_KL = ("trainer", "mismatch_kl/mean")
TRAINER_STEP_TIME = ("trainer", "time/step")
INSTALL = "install"  # the phase ./scripts/quickstart.sh names after creating or checking .venv


@dataclass
class RunSummary:
    """What the quickstart reports at the end; None where the run reported nothing."""

    num_steps: int
    """RL steps the trainer reported."""
    window: int
    reward_first: float | None
    """Mean reward over the first ``window`` steps with a reward."""
    reward_last: float | None
    """Mean reward over the last ``window`` steps with a reward."""
    mismatch_kl: float | None
    """Mean of the trainer's per-step mismatch KL."""
    trainer_step_s: float | None
    """Mean seconds per trainer step."""
    phases_s: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase, as given on the command line."""

    @property
    def reward_gain(self) -> float | None:
        if self.reward_first is None or self.reward_last is None:
            return None
        return self.reward_last - self.reward_first


def read_metrics(path: Path) -> list[dict]:
    """The lines of ``metrics.jsonl``, the last one of each (step, service, replica) only: a
    restarted service may report a step again."""
    if not path.is_file():
        raise ValueError(f"no metrics file at {path}: did the run start, and is this its output_dir?")
    latest: dict[tuple, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            # A run killed mid-write leaves a partial last line: skip it, keep the rest.
            sys.stderr.write(f"skipping line {number} of {path}: {exc}\n")
            continue
        latest[(record.get("step"), record.get("service"), record.get("replica_id"))] = record
    return list(latest.values())


def per_step(records: list[dict], service: str, name: str) -> dict[int, float]:
    """``name`` as reported by ``service`` at each step (mean over replicas), finite values only."""
    values: dict[int, list[float]] = defaultdict(list)
    for record in records:
        value = record.get(name)
        if record.get("service") == service and isinstance(value, (int, float)) and math.isfinite(value):
            values[int(record["step"])].append(float(value))
    return {step: sum(vs) / len(vs) for step, vs in sorted(values.items())}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], window: int = 5, phases_s: dict[str, float] | None = None) -> RunSummary:
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    rewards = list(per_step(records, *REWARD).values())
    kl = per_step(records, *MISMATCH_KL)
    return RunSummary(
        num_steps=len(kl) or len(per_step(records, *TRAINER_STEP_TIME)),
        window=window,
        reward_first=mean(rewards[:window]),
        reward_last=mean(rewards[-window:]),
        mismatch_kl=mean(list(kl.values())),
        trainer_step_s=mean(list(per_step(records, *TRAINER_STEP_TIME).values())),
        phases_s=dict(phases_s or {}),
    )


def format_summary(summary: RunSummary) -> str:
    def show(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    w = summary.window
    lines = [
        f"RL steps trained       {summary.num_steps}",
        f"reward, first {w} steps {show(summary.reward_first, '.3f')}",
        f"reward, last {w} steps  {show(summary.reward_last, '.3f')}  ({show(summary.reward_gain, '+.3f')})",
        f"mismatch KL (mean)     {show(summary.mismatch_kl, '.2e')}",
        f"trainer step (mean)    {show(summary.trainer_step_s, '.1f')} s",
    ]
    if summary.phases_s:
        times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary.phases_s.items())
        lines.append(f"wall time              {sum(summary.phases_s.values()):.0f} s ({times})")
        if INSTALL in summary.phases_s:  # a one-off: what a second run costs is the rest
            rest = sum(s for name, s in summary.phases_s.items() if name != INSTALL)
            lines.append(f"wall time, no install  {rest:.0f} s")
    return "\n".join(lines)


def parse_phase(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    try:
        if not (sep and name):
            raise ValueError
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=SECONDS, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="the run folder (holds metrics.jsonl)")
    parser.add_argument("--window", type=int, default=5, help="steps averaged at the start and the end")
    parser.add_argument("--phase", type=parse_phase, action="append", default=[], metavar="NAME=SECONDS",
                        help="wall time of a phase, shown in the summary (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    try:
        summary = summarize(read_metrics(args.output_dir / "metrics.jsonl"), args.window, dict(args.phase))
    except ValueError as exc:
        sys.stderr.write(f"summarize_run: {exc}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps({**asdict(summary), "reward_gain": summary.reward_gain}) + "\n")
    else:
        sys.stdout.write(format_summary(summary) + "\n")
    return 0 if summary.reward_first is not None else 1


if __name__ == "__main__":
    sys.exit(main())
