"""Trainer throughput on fixed batches, against a bare forward/backward loop in the same run.

Both loops train the same freshly built tiny Qwen3 model on the same packed
micro-batches (samples of ``--sample-len`` tokens packed into rows of
``--seq-len``), one AdamW step per batch of ``--micro-batches`` rows:

* ours: what the trainer does per step: batch checks, tensors from the message,
  temperature-scaled logprobs, the default masked-IS loss, entropy and mismatch
  statistics, grad clipping, the scheduled learning rate, AdamW;
* bare: ``model(ids, position_ids).logits`` -> cross-entropy -> backward -> AdamW.

Tokens/s are the median over ``--steps`` timed steps after one warm-up step each,
alternating the two loops so both see the same machine load. MFU is our FLOPs
estimate (services/trainer/perf.py) over a float32 matmul peak measured here.

    python scripts/bench/trainer.py [--hidden 256] [--layers 4] [--seq-len 1024] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rlbus.logging import setup_logging
from rlbus.messages import MicroBatch, TrainBatch
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.trainer.batch import check_batch
from rlbus.services.trainer.config import LossConfig, OptimizerConfig, SchedulerConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.logprobs import RowTensors
from rlbus.services.trainer.model import load_model
from rlbus.services.trainer.perf import FlopsModel, measure_peak_flops
from rlbus.services.trainer.schedule import LRSchedule
from rlbus.services.trainer.train_step import TrainStep, build_optimizer

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_batch(step: int, args: argparse.Namespace, vocab: int) -> TrainBatch:
    """Rows of whole samples (a quarter prompt, the rest completion with loss)."""
    rng = np.random.default_rng(step)
    per_row = args.seq_len // args.sample_len
    n, prompt = per_row * args.sample_len, args.sample_len // 4
    positions = np.tile(np.arange(args.sample_len), per_row).astype(np.int32)
    mask = positions >= prompt
    micro = [MicroBatch(input_ids=rng.integers(0, vocab, n).astype(np.int32), position_ids=positions, loss_mask=mask,
                        advantages=np.repeat(rng.choice([-1.0, 1.0], per_row), args.sample_len).astype(np.float32),
                        inference_logprobs=np.where(mask, -rng.uniform(4, 7, n), 0).astype(np.float32),
                        temperatures=np.ones(n, np.float32))
             for _ in range(args.micro_batches)]  # fmt: skip
    return TrainBatch(step=step, rank=0, world_size=1, micro_batches=micro,
                      num_loss_tokens=int(mask.sum()) * args.micro_batches)  # fmt: skip


def ours(model: torch.nn.Module, trainer: TrainStep, batch: TrainBatch) -> None:
    check_batch(batch, 0, 1, model.config.vocab_size, model.config.max_position_embeddings)
    rows = [RowTensors.from_message(m, CTX.device) for m in batch.micro_batches]
    trainer.run(batch.step, rows, batch.num_loss_tokens)


def bare(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch) -> None:
    optimizer.zero_grad(set_to_none=True)
    for micro in batch.micro_batches:
        ids = torch.tensor(np.asarray(micro.input_ids), dtype=torch.int64)
        positions = torch.tensor(np.asarray(micro.position_ids), dtype=torch.int64)
        logits = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
        torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--sample-len", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    setup_logging("bench", None, level="warning")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        tiny = TinyModelConfig(out=Path(folder), hidden_size=args.hidden, num_layers=args.layers,
                               intermediate_size=3 * args.hidden,
                               max_position_embeddings=max(2048, args.seq_len))  # fmt: skip
        build_tiny_model(folder, tiny)
        model_ours = load_model(folder, "float32", CTX.device)
        model_bare = load_model(folder, "float32", CTX.device)
    peak = measure_peak_flops(CTX.device, torch.float32)
    optim = OptimizerConfig(lr=1e-5)
    trainer = TrainStep(model_ours, build_optimizer(model_ours, optim), LRSchedule(1e-5, SchedulerConfig(), None),
                        CTX, 1.0, LossConfig(), peak)  # fmt: skip
    optimizer_bare = build_optimizer(model_bare, optim)
    vocab = model_ours.config.vocab_size
    batches = [make_batch(step, args, vocab) for step in range(1, args.steps + 2)]
    tokens = sum(m.input_ids.size for m in batches[0].micro_batches)
    lengths = [args.sample_len] * (args.seq_len // args.sample_len) * args.micro_batches
    flops = FlopsModel.of(model_ours).training_flops(lengths)

    times: dict[str, list[float]] = {"ours": [], "bare": []}
    for index, batch in enumerate(batches):
        for name in ("ours", "bare"):
            started = time.perf_counter()
            if name == "ours":
                ours(model_ours, trainer, batch)
            else:
                bare(model_bare, optimizer_bare, batch)
            if index > 0:  # the first step warms up allocators and kernels
                times[name].append(time.perf_counter() - started)

    params = sum(p.numel() for p in model_ours.parameters())
    sys.stdout.write(f"model: {params / 1e6:.1f}M params, {args.layers} layers x {args.hidden}; "
                     f"batch: {args.micro_batches} rows x {args.seq_len} tokens ({tokens} tokens/step); "
                     f"torch threads: {torch.get_num_threads()}; matmul peak {peak / 1e9:.0f} GFLOP/s\n")  # fmt: skip
    sys.stdout.write(f"{'loop':<5} {'s/step':>8} {'tokens/s':>9} {'MFU':>6} {'ours/bare':>9}\n")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name in ("ours", "bare"):
        ratio = f"{median['bare'] / median['ours']:.2f}" if name == "ours" else ""
        mfu = flops / median[name] / peak
        sys.stdout.write(f"{name:<5} {median[name]:>8.3f} {tokens / median[name]:>9.0f} {mfu:>6.1%} {ratio:>9}\n")


if __name__ == "__main__":
    main()
