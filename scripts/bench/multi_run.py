"""Trainer throughput with one LoRA run against two runs sharing the trainer, in the same invocation.

Each loop trains LoRA adapters (rank ``--rank`` on every projection) of the same frozen base on
batches of the quickstart's shape (``scripts/bench/trainer.py``'s ``make_batch``: the orchestrator's
packing of ``--samples`` RL sequences):

* single: today's single-run LoRA trainer (PEFT's ``default`` adapter, one ``TrainStep``);
* table-1: :class:`rlbus.services.trainer.multi_run.RunTable` holding one run;
* table-2: a ``RunTable`` holding two runs (adapters of the same shape, other learning rates), their steps
  interleaved as a trainer serving two orchestrators would take them.

Tokens/s count real tokens of every run's batches. Medians over ``--steps`` timed steps per run
after one warm-up step, the loops alternating so they see the same machine load. The last line
is ``multi_run two/one <tokens/s of table-2 / tokens/s of single>``: 1.0 means a second run
costs the trainer nothing beyond its own batches.

    python scripts/bench/multi_run.py [--steps 5] [--samples 64] [--rank 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer import CTX, add_batch_args, build_model, make_batch, samples_of

from rlbus.logging import setup_logging
from rlbus.messages import TrainBatch
from rlbus.services.trainer.config import LossConfig, OptimizerConfig, SchedulerConfig, TrainerConfig
from rlbus.services.trainer.logprobs import RowTensors
from rlbus.services.trainer.lora import apply_lora
from rlbus.services.trainer.lora_config import ALL_LINEAR, LoraConfig
from rlbus.services.trainer.model import load_model
from rlbus.services.trainer.multi_run import RunSpec, RunTable, StepSettings
from rlbus.services.trainer.perf import measure_peak_flops
from rlbus.services.trainer.schedule import LRSchedule
from rlbus.services.trainer.train_step import TrainStep, build_optimizer

LOOPS = ("single", "table-1", "table-2")
RUNS = {"table-1": ("one",), "table-2": ("one", "two")}


def rows_of(batch: TrainBatch) -> tuple[list[RowTensors], int]:
    return [RowTensors.from_message(m, CTX.device) for m in batch.micro_batches], batch.num_loss_tokens


def run_spec(run_id: str, args: argparse.Namespace, steps: int) -> RunSpec:
    # Both adapters the same size (another rate only), so two runs' work is exactly twice one run's.
    lora = {"rank": args.rank, "alpha": 2.0 * args.rank, "target_modules": ALL_LINEAR}
    return RunSpec(run_id=run_id, lora=lora, optimizer={"lr": 3e-3 if run_id == "one" else 1e-3},
                   loss=LossConfig(), max_steps=steps)  # fmt: skip


def single_trainer(path: str, args: argparse.Namespace, peak: float) -> Callable[[int, TrainBatch], None]:
    model = apply_lora(load_model(path, "float32", CTX.device), LoraConfig(rank=args.rank, alpha=2.0 * args.rank))
    optim = OptimizerConfig(lr=3e-3)
    trainer = TrainStep(model, build_optimizer(model, optim), LRSchedule(optim.lr, SchedulerConfig(), None), CTX,
                        optim.max_grad_norm, LossConfig(), peak, padded_rows=TrainerConfig().padded_rows())  # fmt: skip
    return lambda step, batch: trainer.run(step, *rows_of(batch))


def table_trainer(path: str, args: argparse.Namespace, peak: float, run_ids: tuple[str, ...],
                  steps: int) -> Callable[[int, TrainBatch], None]:  # fmt: skip
    settings = StepSettings(ctx=CTX, peak_flops=peak, padded_rows=TrainerConfig().padded_rows())
    table = RunTable(load_model(path, "float32", CTX.device), len(run_ids), settings)
    for run_id in run_ids:
        table.join(run_spec(run_id, args, steps))

    def train(step: int, batch: TrainBatch) -> None:
        for run_id in run_ids:  # each run its own batch: the same shape, other samples
            table.train(run_id, step, *rows_of(batch if run_id == "one" else args.other[step]))

    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(parser)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    setup_logging("bench", None, level="warning")
    torch.manual_seed(0)
    peak = measure_peak_flops(CTX.device, torch.float32)
    total = args.steps + 1
    with tempfile.TemporaryDirectory() as folder:
        path = build_model(args, folder)
        vocab = load_model(path, "float32", CTX.device).config.vocab_size
        batches = {step: make_batch(step, args, vocab) for step in range(1, total + 1)}
        args.other = {step: make_batch(1000 + step, args, vocab) for step in range(1, total + 1)}
        loops = {"single": single_trainer(path, args, peak)}
        loops |= {name: table_trainer(path, args, peak, RUNS[name], total) for name in RUNS}
    times: dict[str, list[float]] = {name: [] for name in LOOPS}
    for step, batch in batches.items():
        for name in LOOPS:
            started = time.perf_counter()
            loops[name](step, batch)
            if step > 1:  # the first step warms up allocators and kernels
                times[name].append(time.perf_counter() - started)
    tokens = {step: sum(len(s) for s in samples_of(b)) for step, b in batches.items()}
    other = {step: sum(len(s) for s in samples_of(b)) for step, b in args.other.items()}
    report(args, times, statistics.median(tokens[s] for s in range(2, total + 1)),
           statistics.median(other[s] for s in range(2, total + 1)))  # fmt: skip


def report(args: argparse.Namespace, times: dict[str, list[float]], tokens: float, other_tokens: float) -> None:
    sys.stdout.write(f"LoRA rank {args.rank}; batches of {args.samples} samples of {args.min_len}-{args.max_len} "
                     f"tokens; torch threads: {torch.get_num_threads()}; medians of {args.steps} steps\n")  # fmt: skip
    sys.stdout.write(f"{'loop':<8} {'runs':>4} {'s/step':>8} {'tokens/s':>9} {'/single':>8}\n")
    rate = {}
    for name in LOOPS:
        median = statistics.median(times[name])
        rate[name] = (tokens + (other_tokens if name == "table-2" else 0)) / median
        runs = len(RUNS.get(name, ("default",)))
        sys.stdout.write(f"{name:<8} {runs:>4} {median:>8.3f} {rate[name]:>9.0f} "
                         f"{rate[name] / rate['single']:>8.2f}\n")  # fmt: skip
    sys.stdout.write(f"multi_run two/one {rate['table-2'] / rate['single']:.2f}\n")


if __name__ == "__main__":
    main()
