"""Summarise an rlbus run from the monitor's ``<output_dir>/metrics.jsonl``.

Prints the mean reward over the first and the last ``--window`` RL steps (the
orchestrator's ``reward/all/mean``), their difference, the mean mismatch KL
(the trainer's ``mismatch_kl/mean``: how far the trainer's logprobs are from
those inference sampled with), the steps trained, and the wall time of each
phase given with ``--phase NAME=SECONDS``. ``./scripts/quickstart.sh`` ends with it.

With ``--eval NAME`` it also prints a few samples of the first and the last step
(``samples.jsonl``), the held-out evaluation ``eval/NAME/avg@1`` of the first and the last
evaluated policy, with ``--compare LABEL=FILE`` the same metric from another run's
``rlbus eval`` (``<dir>/eval/metrics.json``), and ends with ``eval before <avg@1> after <avg@1>``.

usage: python scripts/summarize_run.py OUTPUT_DIR [--window 5] [--phase sft=120 ...] [--eval NAME
       [--compare LABEL=FILE]] [--json]
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


def eval_before_after(records: list[dict], name: str) -> tuple[float, float] | None:
    """``eval/<name>/avg@1`` of the first and the last evaluated policy step (None: fewer than two)."""
    values = per_step(records, "orchestrator", f"eval/{name}/avg@1")
    if len(values) < 2:
        return None
    steps = sorted(values)
    return values[steps[0]], values[steps[-1]]


def compared_eval(path: Path, name: str) -> float | None:
    """``eval/<name>/avg@1`` from an ``rlbus eval`` metrics file, None when it has none."""
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("metrics", {}).get(f"eval/{name}/avg@1")
    return float(value) if isinstance(value, (int, float)) else None


def sample_lines(path: Path, per_step_shown: int = 4) -> list[str]:
    """A few ``prompt -> completion (reward)`` samples of the first and the last logged step."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return []
    lines = []
    for label, step in (("first", min(r["step"] for r in rows)), ("last", max(r["step"] for r in rows))):
        shown = [r for r in rows if r["step"] == step][:per_step_shown]
        text = ", ".join(f"{r['prompt']!r} -> {r['completion']!r} ({r['reward']:g})" for r in shown)
        lines.append(f"samples, {label} step ({step}): {text}")
    return lines


def format_eval(records: list[dict], output_dir: Path, name: str, compare: list[tuple[str, Path]]) -> list[str]:
    lines = sample_lines(output_dir / "samples.jsonl")
    for label, path in compare:
        value = compared_eval(path, name)
        lines.append(f"{label}: eval {'n/a' if value is None else format(value, '.3f')}")
    before_after = eval_before_after(records, name)
    if before_after is None:
        lines.append(f"eval before n/a after n/a (fewer than two evaluations of {name} in metrics.jsonl)")
    else:
        lines.append(f"eval before {before_after[0]:.3f} after {before_after[1]:.3f}")
    return lines


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
    parser.add_argument("--eval", dest="eval_name", metavar="NAME",
                        help="held-out evaluation (eval/NAME/avg@1) to show before and after, last line")
    parser.add_argument("--compare", type=parse_compare, action="append", default=[], metavar="LABEL=FILE",
                        help="another run's `rlbus eval` metrics.json to show beside it (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.output_dir / "metrics.jsonl")
        summary = summarize(records, args.window, dict(args.phase))
    except ValueError as exc:
        sys.stderr.write(f"summarize_run: {exc}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps({**asdict(summary), "reward_gain": summary.reward_gain}) + "\n")
        return 0 if summary.reward_first is not None else 1
    sys.stdout.write(format_summary(summary) + "\n")
    if args.eval_name:
        sys.stdout.write("\n".join(format_eval(records, args.output_dir, args.eval_name, args.compare)) + "\n")
    return 0 if summary.reward_first is not None else 1


def parse_compare(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not (sep and label and path):
        raise argparse.ArgumentTypeError(f"expected LABEL=FILE, got {text!r}")
    return label, Path(path)


if __name__ == "__main__":
    sys.exit(main())
