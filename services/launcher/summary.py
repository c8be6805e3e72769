"""What ``rlbus rl`` says when a run ends: its figures, and where its results are.

Read from the run folder after every service stopped (the monitor last, so its files are
complete): steps.jsonl for steps and rewards, metrics.jsonl for the last evaluation (an
evaluation can finish after its step's steps.jsonl row was written), ``weights/`` for the
final policy. A file a failed run never wrote is left out, never an error: the summary
must not hide why the run ended.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loguru import logger

from rlbus.run_files import EVENTS_FILE, METRICS_FILE, SAMPLES_FILE, STEPS_FILE, read_rows

NUM_AVERAGED = 3
"""Steps averaged at each end of the run for the first and last reward (one step is noisy)."""
REWARD = "orchestrator/reward/all/mean"
WEIGHTS_DIR = re.compile(r"^step_(\d+)$")
CHART_SUFFIXES = (".html", ".png", ".svg")


def log_run_summary(output_dir: Path, wall_time_s: float) -> None:
    """Log the end-of-run summary at INFO (the launcher's console and ``logs/rl.log``)."""
    logger.info("run summary:\n{}", "\n".join(f"  {line}" for line in run_summary(output_dir, wall_time_s)))


def run_summary(output_dir: Path, wall_time_s: float) -> list[str]:
    """The summary's lines."""
    steps = read_rows(output_dir / STEPS_FILE)
    lines = [f"steps done: {len(steps)}" + (f" (last step {steps[-1]['step']})" if steps else "")]
    lines += reward_lines(steps)
    lines += eval_lines(read_rows(output_dir / METRICS_FILE))
    lines.append(f"wall time: {format_duration(wall_time_s)}")
    weights = final_weights(output_dir / "weights")
    lines.append(f"final weights: {weights if weights is not None else 'none written'}")
    lines += [f"{name}: {output_dir / name}" for name in (STEPS_FILE, METRICS_FILE, SAMPLES_FILE, EVENTS_FILE)
              if (output_dir / name).exists()]  # fmt: skip
    charts = chart_files(output_dir)
    lines.append("charts: " + (", ".join(map(str, charts)) if charts else "none written (rlbus plot <output_dir>)"))
    return lines


def reward_lines(steps: list[dict[str, Any]]) -> list[str]:
    rewards = [row[REWARD] for row in steps if isinstance(row.get(REWARD), int | float)]
    if not rewards:
        return ["reward: none reported"]
    n = min(NUM_AVERAGED, len(rewards))
    first, last = sum(rewards[:n]) / n, sum(rewards[-n:]) / n
    return [f"reward/all/mean: {first:.4f} (mean of the first {n} steps) -> {last:.4f} (last {n})"]


def eval_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """The figures of the last evaluation report, if any."""
    for line in reversed(metrics):
        figures = {k: v for k, v in line.items() if k.startswith("eval/") and "@" in k}
        if figures:
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in sorted(figures.items()))  # fmt: skip
            return [f"last eval (policy step {line.get('step')}): {shown}"]
    return []


def final_weights(weights_dir: Path) -> Path | None:
    """The complete ``weights/step_N`` folder of the highest step (``.partial`` ones are unfinished)."""
    steps = [int(m.group(1)) for p in weights_dir.glob("step_*") if (m := WEIGHTS_DIR.match(p.name))]
    return weights_dir / f"step_{max(steps)}" if steps else None


def chart_files(output_dir: Path) -> list[Path]:
    """Charts in the run folder or its ``charts/`` folder (the monitor draws them there as it stops)."""
    candidates = [*output_dir.glob("*"), *(output_dir / "charts").glob("*")]
    return sorted(p for p in candidates if p.suffix in CHART_SUFFIXES and p.is_file())


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
