"""Charts of run folders (rlbus.plots) and ``rlbus plot``: real PNGs from steps.jsonl rows as the monitor writes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from loguru import logger
from matplotlib.image import imread

from rlbus.plots import (
    CHARTS,
    CHARTS_DIR,
    DPI,
    FIGURE_SIZE,
    GRID_WIDTH,
    chart_figure,
    draw_run_charts,
    read_run,
    write_charts,
)

ROOT = Path(__file__).resolve().parents[3]
CHART = {chart.name: chart for chart in CHARTS}
EVERY_CHART = ["reward", "loss", "entropy", "mismatch_kl", "throughput", "step_time"]


def full_row(step: int, scale: float = 1.0) -> dict:
    """A steps.jsonl row of an RL run with every figure the charts draw."""
    return {
        "step": step, "time": 1000.0 + step, "elapsed_s": float(step), "complete": True,
        "orchestrator/reward/all/mean": 0.1 * step * scale, "trainer/loss/mean": 1.0 / step * scale,
        "trainer/entropy/mean": 2.0 - 0.1 * step, "trainer/mismatch_kl/mean": 1e-6 * step * scale,
        "trainer/mismatch_kl/max": 1e-4 * step, "trainer/perf/throughput": 500.0 + step,
        "inference/tokens_per_s": 900.0 * scale, "trainer/time/step": 3.0, "orchestrator/time/generate": 2.0,
        "trainer/time/forward_backward": 0.5 * scale, "trainer/time/broadcast_weights": 0.1,
        "inference/weight_update_s": 0.05,
    }  # fmt: skip


def write_run(folder: Path, rows: list[dict], metrics: list[dict] = (), tail: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "steps.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    return folder


def evals(step: int, avg: float) -> dict:
    return {"step": step, "service": "orchestrator", "replica_id": "o", "time": 1.0,
            "eval/math/avg@4": avg, "eval/math/pass@4": min(1.0, 2 * avg), "eval/math/num_examples": 8.0}  # fmt: skip


def assert_real_png(path: Path) -> None:
    """A PNG matplotlib reads back, of a chart's size (one panel, or a grid two panels wide), not blank."""
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] == 4, image.shape  # RGBA, as Agg writes it
    height, width = image.shape[:2]
    assert (height, width) == (FIGURE_SIZE[1] * DPI, FIGURE_SIZE[0] * DPI) or width == GRID_WIDTH * DPI, image.shape
    rgb = np.round(image[..., :3] * 255).astype(np.uint32)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colours) > 20, f"{path} is blank: {len(colours)} colours"  # axes, text and coloured lines


def test_one_run_gets_every_chart_as_a_real_png(tmp_path):
    run = write_run(tmp_path / "run", [full_row(step) for step in range(1, 6)],
                    [evals(0, 0.1), evals(2, 0.3), evals(4, 0.5)], tail='{"step": 6, "trainer/lo')  # fmt: skip
    written, skipped = write_charts([read_run(run)], tmp_path / "charts")
    assert [path.name for path in written] == [f"{name}.png" for name in EVERY_CHART] and skipped == []
    for path in written:
        assert_real_png(path)
    assert not list((tmp_path / "charts").glob("*.partial"))


def test_the_reward_chart_holds_train_reward_and_each_evaluation_at_its_step(tmp_path):
    # An evaluation of step 2 reported twice (a restarted orchestrator): the last report counts.
    run = write_run(tmp_path / "run", [full_row(step) for step in range(1, 4)],
                    [evals(0, 0.1), evals(2, 0.2), evals(2, 0.3)], tail='{"step": 4')  # fmt: skip
    (axes,) = chart_figure(CHART["reward"], [read_run(run)]).axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {"train reward (mean)", "eval/math/avg@4", "eval/math/pass@4"}
    assert list(lines["train reward (mean)"].get_xdata()) == [1, 2, 3]  # the cut-off row is skipped
    assert list(lines["eval/math/avg@4"].get_xdata()) == [0, 2]
    assert list(lines["eval/math/avg@4"].get_ydata()) == [0.1, 0.3]


def test_a_resumed_run_draws_the_last_row_of_each_step_in_step_order(tmp_path):
    # Stopped after step 3, resumed from the checkpoint of step 2: steps 3 and 4 come after.
    rows = [full_row(1), full_row(2), full_row(3, scale=9.0), full_row(3), full_row(4)]
    (axes,) = chart_figure(CHART["loss"], [read_run(write_run(tmp_path / "run", rows))]).axes
    (line,) = axes.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert list(line.get_ydata()) == [1.0 / step for step in range(1, 5)]


def test_several_runs_are_one_line_each_named_by_folder(tmp_path):
    runs = [read_run(write_run(tmp_path / name, [full_row(step, scale) for step in range(1, 5)]))
            for name, scale in (("baseline", 1.0), ("higher-lr", 2.0), ("lower-lr", 0.5))]  # fmt: skip
    (axes,) = chart_figure(CHART["loss"], runs).axes
    assert [line.get_label() for line in axes.get_lines()] == ["baseline", "higher-lr", "lower-lr"]
    assert list(axes.get_lines()[1].get_ydata()) == [2.0 / step for step in range(1, 5)]
    assert len({line.get_color() for line in axes.get_lines()}) == 3
    step_time = chart_figure(CHART["step_time"], runs)
    assert len(step_time.axes) == 5  # a panel per column the runs have, each with a line per run
    assert all(len(panel.get_lines()) == 3 for panel in step_time.axes)
    written, _ = write_charts(runs, tmp_path / "compared")
    assert [path.name for path in written] == [f"{name}.png" for name in EVERY_CHART]
    for path in written:
        assert_real_png(path)


def test_a_run_without_a_figure_is_left_out_of_its_chart(tmp_path):
    rows_without_entropy = [{k: v for k, v in full_row(step).items() if "entropy" not in k} for step in (1, 2)]
    runs = [read_run(write_run(tmp_path / "a", [full_row(1), full_row(2)])),
            read_run(write_run(tmp_path / "b", rows_without_entropy))]  # fmt: skip
    (axes,) = chart_figure(CHART["entropy"], runs).axes
    assert [line.get_label() for line in axes.get_lines()] == ["a"]


def test_missing_figures_leave_charts_out_and_nulls_are_gaps(tmp_path):
    # An SFT-like run: a loss (one null: a NaN written as null), nothing else the charts draw.
    rows = [{"step": 1, "sft/loss/mean": 2.0}, {"step": 2, "sft/loss/mean": None}, {"step": 3, "sft/loss/mean": 1.0}]
    written, skipped = write_charts([read_run(write_run(tmp_path / "sft", rows))], tmp_path / "charts")
    assert [path.name for path in written] == ["loss.png"]
    assert [note.split(":")[0] for note in skipped] == ["reward", "entropy", "mismatch_kl", "throughput", "step_time"]
    (axes,) = chart_figure(CHART["loss"], [read_run(tmp_path / "sft")]).axes
    assert list(axes.get_lines()[0].get_xdata()) == [1, 3]


def test_a_run_that_just_started_has_no_charts_and_no_error(tmp_path):
    for name, content in (("empty", ""), ("half", '{"step": 1, "trainer/loss/me')):
        run = tmp_path / name
        run.mkdir()
        (run / "steps.jsonl").write_text(content)
        written, skipped = write_charts([read_run(run)], run / "charts")
        assert written == [] and len(skipped) == len(CHARTS)
    assert draw_run_charts(tmp_path / "never-written") == []


def test_mismatch_kl_is_on_a_log_scale_only_when_every_value_is_positive(tmp_path):
    positive = read_run(write_run(tmp_path / "positive", [full_row(step) for step in (1, 2)]))
    assert chart_figure(CHART["mismatch_kl"], [positive]).axes[0].get_yscale() == "log"
    zero = read_run(write_run(tmp_path / "zero", [{"step": 1, "trainer/mismatch_kl/mean": 0.0}]))
    assert chart_figure(CHART["mismatch_kl"], [zero]).axes[0].get_yscale() == "linear"


def test_drawing_errors_are_logged_never_raised(tmp_path):
    run = write_run(tmp_path / "run", [full_row(1)])
    (run / CHARTS_DIR).write_text("a file where the charts folder goes")
    messages: list[str] = []
    handler = logger.add(messages.append, level="WARNING", format="{message}")
    try:
        assert draw_run_charts(run) == []
    finally:
        logger.remove(handler)
    assert any(f"charts of {run} not drawn" in message and "rlbus plot" in message for message in messages), messages


def rlbus_plot(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "rlbus", "plot", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_rlbus_plot_one_run_writes_into_its_folder_and_prints_the_paths(tmp_path):
    run = write_run(tmp_path / "run", [full_row(step) for step in (1, 2)], tail='{"step": 3')
    result = rlbus_plot(str(run))
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert printed == [run / CHARTS_DIR / f"{name}.png" for name in EVERY_CHART]
    for path in printed:
        assert_real_png(path)


def test_rlbus_plot_compares_runs_into_out(tmp_path):
    runs = [write_run(tmp_path / name, [full_row(1), full_row(2)]) for name in ("a", "b")]
    result = rlbus_plot(*map(str, runs))
    assert result.returncode == 2 and "comparing 2 runs needs --out DIR" in result.stderr
    result = rlbus_plot(*map(str, runs), "--out", str(tmp_path / "compared"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "compared").glob("*.png")) == sorted(f"{n}.png" for n in EVERY_CHART)


def test_rlbus_plot_refuses_what_is_not_a_run_folder(tmp_path):
    result = rlbus_plot(str(tmp_path / "missing"))
    assert result.returncode == 2 and f"{tmp_path / 'missing'} is not a folder" in result.stderr
    result = rlbus_plot(str(tmp_path))
    assert result.returncode == 2 and "has no steps.jsonl or metrics.jsonl" in result.stderr
    assert rlbus_plot().returncode == 2
