"""Trainer memory and checkpoint figures: activation checkpointing, micro-batches, async saves.

Peak memory of one training step (SFT loss on ``--rows`` packed rows of ``--seq-len`` tokens) with
``memory.ac`` off and on and with ``memory.micro_batch_size`` rows per forward; each variant runs in
a fresh process, since a process's peak resident set only grows. On CPU the figure is the peak
resident set during the step minus the resident set before it (weights, gradients and optimizer
state of the warm-up step are already there, so what remains is mostly activations); on a GPU the
peak allocated memory during the step minus what was allocated before it.

Then training steps that each save a checkpoint (``ckpt.interval = 1``), synchronously and with
``ckpt.save_async`` (the write overlaps the next step): how long ``save`` holds the step up, and the
training step's own time (async: beside the write, which on a CPU shares its cores).

    python scripts/bench/memory.py [--hidden 256] [--layers 8] [--seq-len 1024] [--rows 2] [--steps 3]

Lines to read: ``peak MB ac_off X ac_on Y ratio R`` and ``ckpt step s sync A async B ratio R``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from rlbus.logging import setup_logging
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.trainer.checkpoint import CheckpointManager
from rlbus.services.trainer.config import CheckpointConfig, OptimizerConfig, SchedulerConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.logprobs import RowTensors, row_from_arrays
from rlbus.services.trainer.model import enable_activation_checkpointing, load_model
from rlbus.services.trainer.perf import peak_memory_gib
from rlbus.services.trainer.schedule import LRSchedule
from rlbus.services.trainer.train_step import TrainStep, build_optimizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CTX = DistContext(rank=0, world_size=1, local_rank=0, device=DEVICE)
MEMORY_VARIANTS = {"ac_off": (0, 1), "ac_on": (1, 1), "ac_every_2": (2, 1), "micro_batch_all": (0, 0)}
"""name: (memory.ac, memory.micro_batch_size; 0 = all rows in one forward)."""
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**17), "MALLOC_TRIM_THRESHOLD_": str(2**17)}
"""glibc: large blocks mapped and unmapped on free, so the resident set follows live tensors (by
default it keeps what the warm-up step freed and the step's peak would hide in it)."""


def rows(args: argparse.Namespace, seed: int) -> list[RowTensors]:
    """``args.rows`` rows, each packed with samples of 256 tokens, loss on their second half."""
    rng = np.random.default_rng(seed)
    built = []
    for _ in range(args.rows):
        positions = np.arange(args.seq_len) % 256
        ids = rng.integers(0, 256, args.seq_len)
        built.append(row_from_arrays(ids, positions, positions >= 128, DEVICE))
    return built


def trainer(model_dir: str, ac: int, micro_batch_size: int) -> TrainStep:
    model = load_model(model_dir, "float32", DEVICE)
    enable_activation_checkpointing(model, ac)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-5))
    schedule = LRSchedule(1e-5, SchedulerConfig(), None)
    return TrainStep(model, optimizer, schedule, CTX, 1.0, None, peak_flops=1e12, micro_batch_size=micro_batch_size)


def step_peak_mb(model_dir: str, args: argparse.Namespace, ac: int, micro_batch_size: int) -> float:
    """Peak memory of one step above what the step started with (after a warm-up step)."""
    micro_batch_size = micro_batch_size or args.rows
    train = trainer(model_dir, ac, micro_batch_size)
    batch = rows(args, 0)
    loss_tokens = int(sum(r.loss_mask.sum() for r in batch))
    train.run(1, batch, loss_tokens)  # gradients and optimizer state exist from here on
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = psutil.Process().memory_info().rss
    train.run(2, batch, loss_tokens)
    peak = peak_memory_gib(DEVICE) * 2**30
    return (peak - before) / 2**20


def checkpoint_step_seconds(model_dir: str, args: argparse.Namespace, output: Path) -> dict[str, float]:
    """Medians over steps that each save a checkpoint: the seconds ``save`` holds the step up (sync: the
    whole write; async: the copy, and the wait for a previous write still running) and the seconds
    of the training step itself (async: while the previous step's write runs on the other thread)."""
    batch = rows(args, 1)
    loss_tokens = int(sum(r.loss_mask.sum() for r in batch))
    figures: dict[str, float] = {}
    for mode in ("sync", "async"):
        train = trainer(model_dir, 0, 1)
        config = CheckpointConfig(enabled=True, interval=1, keep_last=1, save_async=mode == "async")
        ckpt = CheckpointManager(output / mode, config, CTX)
        trained, saved = [], []
        for step in range(1, args.steps + 2):
            started = time.perf_counter()
            train.run(step, batch, loss_tokens)
            between = time.perf_counter()
            ckpt.save(step, train.model, train.optimizer, None, {})
            if step > 1:  # the first step warms up
                trained.append(between - started)
                saved.append(time.perf_counter() - between)
        ckpt.wait()
        ckpt.writer.close()
        figures[f"{mode}_train"], figures[f"{mode}_save"] = statistics.median(trained), statistics.median(saved)
    return figures


def measure_one(args: argparse.Namespace) -> None:
    """Child process: one memory variant, as a JSON line."""
    ac, micro_batch_size = MEMORY_VARIANTS[args.variant]
    sys.stdout.write(json.dumps({args.variant: step_peak_mb(args.model, args, ac, micro_batch_size)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed checkpointing steps per mode")
    parser.add_argument("--skip-memory", action="store_true", help="time the checkpoint saves only")
    parser.add_argument("--variant", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_logging("bench", None, level="warning")
    torch.manual_seed(0)
    if args.variant:
        measure_one(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        model_dir = Path(folder) / "model"
        tiny = TinyModelConfig(out=model_dir, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                               num_kv_heads=2, intermediate_size=4 * args.hidden,
                               max_position_embeddings=max(2048, args.seq_len))  # fmt: skip
        build_tiny_model(model_dir, tiny)
        peaks: dict[str, float] = {}
        for variant in MEMORY_VARIANTS if not args.skip_memory else ():
            command = [sys.executable, __file__, "--variant", variant, "--model", str(model_dir),
                       "--seq-len", str(args.seq_len), "--rows", str(args.rows)]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=CHILD_ENV).stdout
            peaks.update(json.loads(output.strip().splitlines()[-1]))
        times = checkpoint_step_seconds(str(model_dir), args, Path(folder) / "runs")
        params = sum(p.numel() for p in load_model(str(model_dir), "float32", DEVICE).parameters())
    report(args, params, peaks, times)


def report(args: argparse.Namespace, params: int, peaks: dict[str, float], times: dict[str, float]) -> None:
    sys.stdout.write(f"model: {params / 1e6:.1f}M params, {args.layers} layers; step: {args.rows} rows of "
                     f"{args.seq_len} tokens; device {DEVICE.type}; torch threads {torch.get_num_threads()}\n")  # fmt: skip
    for variant, peak in peaks.items():
        sys.stdout.write(f"  {variant:<16} step peak {peak:8.1f} MB above the step's start\n")
    if peaks:
        sys.stdout.write(f"peak MB ac_off {peaks['ac_off']:.1f} ac_on {peaks['ac_on']:.1f} "
                         f"ratio {peaks['ac_on'] / max(peaks['ac_off'], 1e-9):.2f}\n")  # fmt: skip
    sync, asynchronous = times["sync_train"] + times["sync_save"], times["async_train"] + times["async_save"]
    sys.stdout.write(f"ckpt save s on the step: sync {times['sync_save']:.3f} async {times['async_save']:.3f}; "
                     f"train s: alone {times['sync_train']:.3f}, beside the write {times['async_train']:.3f}\n")  # fmt: skip
    sys.stdout.write(f"ckpt step s sync {sync:.3f} async {asynchronous:.3f} ratio {asynchronous / sync:.2f}\n")


if __name__ == "__main__":
    main()
