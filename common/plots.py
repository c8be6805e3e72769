"""Charts of run folders: PNGs of ``steps.jsonl`` (and the evaluations in ``metrics.jsonl``), drawn with matplotlib.

The monitor draws a run's charts into ``<output_dir>/charts/`` as it stops (every deployment
has a monitor: local, compose, SLURM), ``rlbus sft`` as its run ends, and ``rlbus plot`` for any
run folder, finished or still running, or for several runs compared in one chart each.

Each chart of :data:`CHARTS` draws some ``steps.jsonl`` columns against ``step``. A column that no
run has is left out, and a chart none of whose columns any run has is not drawn: an SFT run has
no reward, a run that just started has no rows yet. Evaluations (``eval/<env>/avg@k`` and
``pass@k``) are read from metrics.jsonl: steps.jsonl keeps one row per step, and an evaluation
usually finishes after its step's row was written.

One run: one panel, a line (and colour) per column. Several runs: a panel per column, a line
(and colour) per run in each, the legend naming each run by its folder name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from rlbus.run_files import METRICS_FILE, STEPS_FILE, read_rows

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CHARTS_DIR = "charts"
"""Where a run's own charts go, under its ``output_dir``."""
EVAL_FIGURE = re.compile(r"^eval/.+/(avg|pass)@\d+$")
MAX_MARKED_POINTS = 60
"""Lines with at most this many points also mark each point: a short run's lines are a few dots."""
FIGURE_SIZE, DPI = (8.0, 4.5), 100
GRID_WIDTH, GRID_ROW_HEIGHT = 12.0, 3.2
"""Inches of a chart of several panels: its width, and the height of each row of two panels."""


@dataclass(frozen=True)
class Curve:
    key: str
    """``steps.jsonl`` column, e.g. ``trainer/loss/mean``."""
    label: str
    """What the legend calls it."""


@dataclass(frozen=True)
class Chart:
    name: str
    """File name without ``.png``."""
    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    evals: bool = False
    """Also draw the runs' evaluation figures (avg@k, pass@k), each point at its policy step."""
    log_scale: bool = False
    """Logarithmic y axis when every value drawn is positive (a mismatch KL spans decades)."""


CHARTS = (
    Chart("reward", "Reward per step and evaluations", "reward",
          (Curve("orchestrator/reward/all/mean", "train reward (mean)"),), evals=True),
    Chart("loss", "Loss", "loss", (Curve("trainer/loss/mean", "loss"), Curve("sft/loss/mean", "SFT loss"),
                                   Curve("sft/val/loss", "SFT validation loss"))),
    Chart("entropy", "Entropy of the policy on trained tokens", "nats per token",
          (Curve("trainer/entropy/mean", "entropy"),)),
    Chart("mismatch_kl", "Mismatch KL (trainer vs inference logprobs)", "KL",
          (Curve("trainer/mismatch_kl/mean", "mean"), Curve("trainer/mismatch_kl/max", "max")), log_scale=True),
    Chart("throughput", "Throughput", "tokens/s",
          (Curve("trainer/perf/throughput", "trainer"), Curve("inference/tokens_per_s", "generation (inference)"),
           Curve("sft/perf/throughput", "SFT trainer"))),
    Chart("step_time", "Where the step time goes", "seconds",
          (Curve("trainer/time/step", "trainer step (total)"), Curve("orchestrator/time/generate", "generation"),
           Curve("trainer/time/wait_for_batch", "trainer waiting for a batch"),
           Curve("trainer/time/forward_backward", "training (forward + backward)"),
           Curve("trainer/time/broadcast_weights", "weight sync (trainer)"),
           Curve("inference/weight_update_s", "weight sync (inference)"),
           Curve("trainer/time/save_ckpt", "checkpoint"), Curve("sft/time/step", "SFT step"))),
)  # fmt: skip


@dataclass
class RunSeries:
    """The figures of one run folder, as far as its files are written."""

    name: str
    """Legend name: the folder's name."""
    steps: list[dict[str, Any]]
    """``steps.jsonl`` rows in step order, one per step."""
    evals: dict[str, dict[int, float]] = field(default_factory=dict)
    """Evaluation figure -> policy step -> value (a repeated report of a step: the last one)."""

    def points(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a ``steps.jsonl`` column; rows without a number there are skipped."""
        found = [(row["step"], float(row[key])) for row in self.steps if is_number(row.get(key))]
        return [step for step, _ in found], [value for _, value in found]

    def eval_points(self, figure: str) -> tuple[list[int], list[float]]:
        by_step = sorted(self.evals.get(figure, {}).items())
        return [step for step, _ in by_step], [value for _, value in by_step]


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_run(output_dir: Path, name: str | None = None) -> RunSeries:
    """What ``output_dir``'s files hold now (none of them: an empty run)."""
    evals: dict[str, dict[int, float]] = {}
    for row in read_rows(output_dir / METRICS_FILE):
        for key, value in row.items():
            if EVAL_FIGURE.match(key) and is_number(value) and isinstance(row.get("step"), int):
                evals.setdefault(key, {})[row["step"]] = float(value)
    # A resumed run appends the steps it redoes after its checkpoint: the last row of a step counts.
    steps = {row["step"]: row for row in read_rows(output_dir / STEPS_FILE) if isinstance(row.get("step"), int)}
    return RunSeries(name or output_dir.resolve().name, [steps[step] for step in sorted(steps)], evals)


def chart_figure(chart: Chart, runs: Sequence[RunSeries]) -> Figure | None:
    """``chart`` for ``runs``; None when no run has any of its columns. One run: one panel, a line per
    column. Several: a panel per column (side by side when there are several), a line per run in each."""
    panels = chart_panels(chart, runs)
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_cols = 1 if len(panels) == 1 else 2
    num_rows = math.ceil(len(panels) / num_cols)
    size = FIGURE_SIZE if len(panels) == 1 else (GRID_WIDTH, GRID_ROW_HEIGHT * num_rows)
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # PNG without pyplot: no global figure state, no display needed
    title = chart.title + (f" ({len(runs)} runs)" if len(runs) > 1 else "")
    if len(panels) > 1:
        figure.suptitle(title)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(num_rows, num_cols, index + 1)
        for line in panel.lines:
            axes.plot(line.steps, line.values, label=line.label, **line.style)
        panel_title = panel.title if len(panels) > 1 else title
        style_axes(axes, chart, panel_title, [value for line in panel.lines for value in line.values])
    return figure


@dataclass(frozen=True)
class Line:
    label: str
    steps: list[int]
    values: list[float]
    style: dict[str, Any]


@dataclass(frozen=True)
class Panel:
    title: str
    """The column's label (several runs); empty for the only panel of one run."""
    lines: list[Line]


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    is_eval: bool

    def points(self, run: RunSeries) -> tuple[list[int], list[float]]:
        return run.eval_points(self.key) if self.is_eval else run.points(self.key)


def chart_panels(chart: Chart, runs: Sequence[RunSeries]) -> list[Panel]:
    """The panels of ``chart`` that have a line; a column no run has gets none."""
    columns = [Column(curve.key, curve.label, False) for curve in chart.curves]
    if chart.evals:
        columns += [Column(key, key, True) for key in sorted({key for run in runs for key in run.evals})]
    if len(runs) == 1:
        lines = [Line(column.label, *points, line_style(index, len(points[0]), column.is_eval))
                 for index, column in enumerate(columns) if (points := column.points(runs[0]))[0]]  # fmt: skip
        return [Panel("", lines)] if lines else []
    panels = []
    for column in columns:
        lines = [Line(run.name, *points, line_style(index, len(points[0]), column.is_eval))
                 for index, run in enumerate(runs) if (points := column.points(run))[0]]  # fmt: skip
        if lines:
            panels.append(Panel(column.label, lines))
    return panels


def line_style(index: int, num_points: int, is_eval: bool) -> dict[str, Any]:
    """Colour ``index`` (of the column with one run, of the run with several); evaluations, made
    every few steps, are dashed and marked, like any line short enough to mark its points."""
    style: dict[str, Any] = {"color": f"C{index % 10}", "linestyle": "--" if is_eval else "-"}
    if is_eval or num_points <= MAX_MARKED_POINTS:
        style |= {"marker": "o", "markersize": 5 if is_eval else 3}
    return style


def style_axes(axes: Axes, chart: Chart, title: str, values: list[float]) -> None:
    axes.set_title(title, fontsize="medium")
    axes.set_xlabel("step")
    axes.set_ylabel(chart.ylabel)
    axes.grid(True, alpha=0.3)
    if chart.log_scale and values and min(values) > 0:
        axes.set_yscale("log")
    axes.legend(fontsize="small")


def write_charts(runs: Sequence[RunSeries], out_dir: Path) -> tuple[list[Path], list[str]]:
    """Every chart some run has figures for, as ``<out_dir>/<chart>.png``; (written paths, notes on
    the charts left out)."""
    written, skipped = [], []
    for chart in CHARTS:
        figure = chart_figure(chart, runs)
        if figure is None:
            columns = " or ".join(curve.key for curve in chart.curves)
            skipped.append(f"{chart.name}: no figures yet ({columns})")
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        written.append(save_png(figure, out_dir / f"{chart.name}.png"))
    return written, skipped


def save_png(figure: Figure, path: Path) -> Path:
    """Write through a temporary name: a chart being viewed while a running run is re-plotted is
    replaced whole, never seen half-written."""
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, format="png")
    partial.replace(path)
    return path


def draw_run_charts(output_dir: Path) -> list[Path]:
    """A run's charts into ``<output_dir>/charts/``, for a service on its way out. Errors are logged,
    never raised: the metrics are already safe on disk, and ``rlbus plot`` can draw them later."""
    try:
        written, skipped = write_charts([read_run(output_dir)], output_dir / CHARTS_DIR)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong (no matplotlib, a full disk), the run stands
        logger.warning("charts of {} not drawn ({}: {}); draw them later with 'rlbus plot {}'",
                       output_dir, type(exc).__name__, exc, output_dir)  # fmt: skip
        return []
    logger.info("charts: {} drawn in {}{}", len(written), output_dir / CHARTS_DIR,
                f" (left out: {', '.join(note.split(':')[0] for note in skipped)})" if skipped else "")  # fmt: skip
    return written
