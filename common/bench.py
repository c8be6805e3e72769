"""Benchmark mode (``--bench``) of ``rlbus rl`` and ``rlbus sft``: the table of throughput figures.

A bench run is the real training loop for a few steps (:data:`BENCH_STEPS`, or ``max_steps`` when
smaller) with W&B, checkpoints, resuming and evaluation off. At the end the command prints one
row per step and, under them, mean ± std over the steps after the first: the first step loads
kernels, fills caches and, in ``rlbus rl``, waits for vLLM to start, so it is warm-up.

The figures are the trainer's own (rlbus.services.trainer.perf): ``perf/throughput`` (tokens
trained per second of the trainer's step), ``perf/mfu`` (a fraction, shown in %),
``perf/peak_memory`` (GiB: the trainer process's max RSS on CPU, max allocated CUDA memory on a
GPU) and ``time/*``; for ``rlbus rl`` also the completion tokens of the step's rollouts over the
orchestrator's generation time. The input is rows shaped like ``steps.jsonl`` (figures named
``<service>/<metric>``, :mod:`rlbus.run_files`): ``rlbus rl`` reads that file after the run,
``rlbus sft`` keeps its loop's own rows.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from loguru import logger

from rlbus.logging import FILE_ONLY

BENCH_STEPS = 5
"""Steps of a bench run, or fewer where ``max_steps`` says so."""
MIN_RL_BENCH_STEPS = 3
"""Fewest steps of an ``rlbus rl`` bench run: one warm-up step and two to take a mean and std of."""
COLUMN_GAP = "  "
"""Between columns; a cell never holds two spaces in a row, so the table splits on them."""


def bench_steps(max_steps: int | None) -> int:
    """Steps of a bench run: :data:`BENCH_STEPS`, or ``max_steps`` when smaller. A config's own
    ``max_steps`` (the quickstart's 30) is for training; the bench stays short, as prime-rl's does."""
    return BENCH_STEPS if max_steps is None else min(max_steps, BENCH_STEPS)


@dataclass(frozen=True)
class Figure:
    """One column: a number per step, read from (or divided out of) a step row's figures."""

    header: str
    key: str
    """Figure name in the row, ``<service>/<metric>``."""
    per: str | None = None
    """Figure the value is divided by (a rate: tokens per second of generation); None: the value itself."""
    scale: float = 1.0
    """Factor applied for display (a fraction shown in %)."""
    optional: bool = False
    """Shown only when some step has it: the step-time split, which not every row holds."""

    def value(self, row: Mapping[str, Any]) -> float | None:
        """This figure of ``row``; None where the row lacks it (a step a service never reported)."""
        top = _number(row.get(self.key))
        if top is None or self.per is None:
            return None if top is None else top * self.scale
        bottom = _number(row.get(self.per))
        return top / bottom * self.scale if bottom else None


@dataclass(frozen=True)
class BenchSpec:
    """What one command's bench table shows."""

    command: str
    """The command, for the table's title (``rlbus rl``)."""
    trainer: str
    """Service whose figures are the trainer's: ``trainer`` in an RL run, ``sft`` in SFT."""
    figures: tuple[Figure, ...]


def trainer_figures(service: str) -> tuple[Figure, ...]:
    """Step time, tokens/s, MFU and peak memory of the trainer reporting as ``service``."""
    return (
        Figure("step s", f"{service}/time/step"),
        Figure("trainer tok/s", f"{service}/perf/throughput"),
        Figure("MFU %", f"{service}/perf/mfu", scale=100.0),
        Figure("peak mem GiB", f"{service}/perf/peak_memory"),
    )


RL_BENCH = BenchSpec("rlbus rl", "trainer", (
    *trainer_figures("trainer"),
    # The orchestrator's generation time of the step: since the previous batch was built, less
    # the wait for inference to load a newer policy (rlbus.services.orchestrator.step_metrics).
    Figure("gen tok/s", "orchestrator/num_completion_tokens/sum", per="orchestrator/time/generate"),
    # Where a step's time goes: waiting for the batch, forward and backward, publishing weights
    # (the optimizer step is most of the rest of ``step s``), and generating the step's rollouts.
    Figure("wait batch s", "trainer/time/wait_for_batch", optional=True),
    Figure("fwd+bwd s", "trainer/time/forward_backward", optional=True),
    Figure("publish s", "trainer/time/broadcast_weights", optional=True),
    Figure("generate s", "orchestrator/time/generate", optional=True),
))  # fmt: skip
SFT_BENCH = BenchSpec("rlbus sft", "sft", (
    *trainer_figures("sft"),
    Figure("fwd+bwd s", "sft/time/forward_backward", optional=True),
))  # fmt: skip


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def bench_table(rows: Sequence[Mapping[str, Any]], spec: BenchSpec) -> list[str]:
    """The table's lines: a title, a header, one line per step, then mean ± std, then notes."""
    if not rows:
        return [f"{spec.command} bench: no step finished, so there are no figures (see the logs)"]
    figures = [f for f in spec.figures if not f.optional or any(f.value(row) is not None for row in rows)]
    measured = rows[1:] or rows
    steps = [str(row.get("step", "?")) for row in rows]
    cells = [["step", *(f.header for f in figures)]]
    cells += [[step, *(_format(f.value(row)) for f in figures)] for step, row in zip(steps, rows, strict=True)]
    cells.append(["mean", *(_summary(f, measured) for f in figures)])
    if len(rows) > 1:
        title = (f"{spec.command} bench: {len(rows)} steps; mean ± std over steps {steps[1]}-{steps[-1]} "
                 f"(step {steps[0]} is warm-up)")  # fmt: skip
    else:
        title = f"{spec.command} bench: 1 step, the warm-up step alone: run more steps (--max-steps) for a mean"
    return [title, *_aligned(cells), *_notes(measured, spec)]


def print_bench_table(rows: Sequence[Mapping[str, Any]], spec: BenchSpec, out: TextIO | None = None) -> None:
    """Write the table to ``out`` (stdout: the command's output) and to the log file."""
    text = "\n".join(bench_table(rows, spec)) + "\n"
    (out or sys.stdout).write(text)
    logger.bind(**{FILE_ONLY: True}).info("bench table:\n{}", text.rstrip())


def _summary(figure: Figure, rows: Sequence[Mapping[str, Any]]) -> str:
    values = [v for v in (figure.value(row) for row in rows) if v is not None]
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{_format(mean)} ± {_format(std)}"


def _notes(measured: Sequence[Mapping[str, Any]], spec: BenchSpec) -> list[str]:
    loss_tokens = [_number(row.get(f"{spec.trainer}/progress/loss_tokens")) for row in measured]
    if loss_tokens and all(n == 0 for n in loss_tokens):
        # An RL step whose groups all had equal rewards trains a placeholder batch: fast and meaningless.
        note = ("note: the trainer had no loss tokens in these steps, so its figures measure near-empty batches "
                "(in RL: every group's rewards were equal; use a model or task with varied rewards)")  # fmt: skip
        return [note]
    return []


def _aligned(cells: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return [COLUMN_GAP.join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    # Three significant digits, trailing zeros kept so a column reads evenly (16.0 next to 7.75).
    return f"{value:.0f}" if abs(float(f"{value:.3g}")) >= 100 else f"{value:#.3g}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
