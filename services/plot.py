"""``rlbus plot <output_dir> [<output_dir> ...] [--out DIR]``: a run's charts as PNG files.

Draws from what the run folder holds now, so it works on a finished run and on one still
running (its last, half-written line is skipped). One folder: its charts go to
``<output_dir>/charts/``, where the monitor draws them when a run ends. Several folders: one
chart per figure with a line per run, into ``--out``. Charts are described in :mod:`rlbus.plots`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rlbus.plots import CHARTS_DIR, RunSeries, read_run, write_charts
from rlbus.run_files import run_folder_problem


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rlbus plot",
        description="Draw a run's charts (reward and evaluations, loss, entropy, mismatch KL, throughput, step "
        "time) as PNG files from its steps.jsonl and metrics.jsonl; several runs are compared in one chart each.",
    )  # fmt: skip
    parser.add_argument("output_dirs", nargs="+", type=Path, metavar="output_dir", help="run folder(s)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for the PNG files (default with one run: <output_dir>/{CHARTS_DIR}; "
                             "needed with several)")  # fmt: skip
    args = parser.parse_args(list(argv))
    problem = run_folder_problem(args.output_dirs) or (
        f"comparing {len(args.output_dirs)} runs needs --out DIR (where to write the charts)"
        if args.out is None and len(args.output_dirs) > 1 else None
    )  # fmt: skip
    if problem:
        sys.stderr.write(f"rlbus plot: {problem}\n")
        return 2
    out = args.out or args.output_dirs[0] / CHARTS_DIR
    written, skipped = write_charts(read_runs(args.output_dirs), out)
    for path in written:
        sys.stdout.write(f"{path}\n")
    for note in skipped:
        sys.stderr.write(f"rlbus plot: left out {note}\n")
    if not written:
        sys.stderr.write("rlbus plot: no chart written: the runs have no figures yet\n")
    return 0


def read_runs(output_dirs: Sequence[Path]) -> list[RunSeries]:
    """The runs, each named by its folder; folders of the same name (``a/run``, ``b/run``) by the path given."""
    names = [output_dir.resolve().name for output_dir in output_dirs]
    return [read_run(output_dir, name if names.count(name) == 1 else str(output_dir))
            for output_dir, name in zip(output_dirs, names, strict=True)]  # fmt: skip
