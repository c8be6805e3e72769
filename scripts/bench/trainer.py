"""Trainer throughput on RL batches of the quickstart's shape, against simple alternatives in the same run.

Each step trains on a fresh batch like the quickstart's: ``--samples`` sequences of
``--min-len``..``--max-len`` tokens (a ``--prompt-len`` prompt, the rest completion
with loss), packed by the orchestrator's own ``pack_batch`` into rows of ``--seq-len``
tokens. Loops, each on its own copy of the same model:

* ours: what the trainer does per step (``TrainStep``: batch checks, tensors from the
  message, temperature-scaled logprobs, the default masked-IS loss, entropy and mismatch
  statistics, grad clipping, the scheduled rate, AdamW), rows run as ``trainer.row_layout``
  says (``auto``: padded batches of each row's samples on CPU);
* ours-packed: the same with every row run packed (``row_layout = "packed"``, the layout
  before the padded one);
* padded: the best simple alternative, one padded batch of all the samples
  (``model(ids, attention_mask)`` -> cross-entropy -> backward -> AdamW);
* packed: the same bare loop over the packed rows.

Tokens/s count real tokens (no padding). Medians over ``--steps`` timed steps after one
warm-up step each, the loops alternating so they see the same machine load. The last
line is ``trainer ours/padded <ratio>`` (target >= 0.9).

    python scripts/bench/trainer.py [--model DIR] [--samples 64] [--seq-len 1024] [--steps 5]
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
from rlbus.messages import TrainBatch
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.orchestrator.packing import pack_batch
from rlbus.services.orchestrator.rollouts import PackSample
from rlbus.services.trainer.batch import check_batch
from rlbus.services.trainer.config import LossConfig, OptimizerConfig, SchedulerConfig, TrainerConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.logprobs import RowTensors
from rlbus.services.trainer.model import load_model
from rlbus.services.trainer.perf import measure_peak_flops
from rlbus.services.trainer.schedule import LRSchedule
from rlbus.services.trainer.train_step import TrainStep, build_optimizer

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_batch(step: int, args: argparse.Namespace, vocab: int) -> TrainBatch:
    """The orchestrator's packing of ``args.samples`` random RL samples."""
    rng = np.random.default_rng(step)
    samples = []
    for length in rng.integers(args.min_len, args.max_len + 1, args.samples).tolist():
        mask = np.arange(length) >= args.prompt_len
        samples.append(PackSample(input_ids=rng.integers(0, vocab, length).astype(np.int32), loss_mask=mask,
                                  inference_logprobs=np.where(mask, -rng.uniform(0.5, 3, length), 0).astype(np.float32),
                                  advantage=float(rng.choice([-0.2, 0.2])), temperature=1.0))  # fmt: skip
    (batch,), _ = pack_batch(samples, step, args.seq_len, world_size=1)
    return batch


def ours(model: torch.nn.Module, trainer: TrainStep, batch: TrainBatch) -> None:
    check_batch(batch, 0, 1, model.config.vocab_size, model.config.max_position_embeddings)
    rows = [RowTensors.from_message(m, CTX.device) for m in batch.micro_batches]
    trainer.run(batch.step, rows, batch.num_loss_tokens)


def samples_of(batch: TrainBatch) -> list[np.ndarray]:
    """The batch's sequences, unpacked (a new one starts wherever a position is 0)."""
    found = []
    for micro in batch.micro_batches:
        starts = np.flatnonzero(np.asarray(micro.position_ids) == 0).tolist() + [len(micro.input_ids)]
        found += [np.asarray(micro.input_ids[a:b]) for a, b in zip(starts, starts[1:]) if b - a > 1]
    return found


def bare_padded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch) -> None:
    samples = samples_of(batch)
    longest = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), longest, dtype=torch.int64)
    mask = torch.zeros(len(samples), longest, dtype=torch.int64)
    for i, sample in enumerate(samples):
        ids[i, : len(sample)], mask[i, : len(sample)] = torch.from_numpy(sample.astype(np.int64)), 1
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    optimizer.step()


def bare_packed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch) -> None:
    optimizer.zero_grad(set_to_none=True)
    for micro in batch.micro_batches:
        ids = torch.tensor(np.asarray(micro.input_ids), dtype=torch.int64)
        positions = torch.tensor(np.asarray(micro.position_ids), dtype=torch.int64)
        logits = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
        torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).backward()
    optimizer.step()


def build_model(args: argparse.Namespace, folder: str) -> str:
    if args.model:
        return args.model
    tiny = TinyModelConfig(out=Path(folder), hidden_size=args.hidden, num_layers=args.layers, num_heads=2,
                           num_kv_heads=1, intermediate_size=4 * args.hidden, max_position_embeddings=512)  # fmt: skip
    build_tiny_model(folder, tiny)
    return folder


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    """The model and batch shape options (also scripts/bench/multi_run.py's)."""
    parser.add_argument("--model", default=None, help="model folder (default: a tiny model of the quickstart's size)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=130)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=110)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(parser)
    args = parser.parse_args()
    setup_logging("bench", None, level="warning")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as folder:
        path = build_model(args, folder)
        models = {name: load_model(path, "float32", CTX.device) for name in LOOPS}
    peak = measure_peak_flops(CTX.device, torch.float32)
    optim = OptimizerConfig(lr=1e-5)
    optimizers = {name: build_optimizer(model, optim) for name, model in models.items()}
    trainers = {name: TrainStep(models[name], optimizers[name], LRSchedule(1e-5, SchedulerConfig(), None), CTX, 1.0,
                                LossConfig(), peak, padded_rows=layout)
                for name, layout in (("ours", TrainerConfig().padded_rows()), ("ours-packed", False))}  # fmt: skip
    vocab = models["ours"].config.vocab_size
    batches = [make_batch(step, args, vocab) for step in range(1, args.steps + 2)]
    times: dict[str, list[float]] = {name: [] for name in LOOPS}
    tokens: list[int] = []
    for index, batch in enumerate(batches):
        for name in LOOPS:
            started = time.perf_counter()
            if name in trainers:
                ours(models[name], trainers[name], batch)
            else:
                (bare_padded if name == "padded" else bare_packed)(models[name], optimizers[name], batch)
            if index > 0:  # the first step warms up allocators and kernels
                times[name].append(time.perf_counter() - started)
        if index > 0:
            tokens.append(sum(len(s) for s in samples_of(batch)))
    report(models["ours"], args, batches[0], times, statistics.median(tokens), peak)


def report(model: torch.nn.Module, args: argparse.Namespace, batch: TrainBatch, times: dict[str, list[float]],
           tokens: float, peak: float) -> None:  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    sys.stdout.write(f"model: {params / 1e6:.1f}M params; batch: {args.samples} samples of "
                     f"{args.min_len}-{args.max_len} tokens in {len(batch.micro_batches)} rows of <= {args.seq_len}; "
                     f"torch threads: {torch.get_num_threads()}; matmul peak {peak / 1e9:.0f} GFLOP/s\n")  # fmt: skip
    median = {name: statistics.median(values) for name, values in times.items()}
    sys.stdout.write(f"{'loop':<12} {'s/step':>8} {'tokens/s':>9} {'/padded':>8}\n")
    for name in LOOPS:
        sys.stdout.write(f"{name:<12} {median[name]:>8.3f} {tokens / median[name]:>9.0f} "
                         f"{median['padded'] / median[name]:>8.2f}\n")  # fmt: skip
    sys.stdout.write(f"trainer ours/padded {median['padded'] / median['ours']:.2f}\n")


LOOPS = ("ours", "ours-packed", "padded", "packed")


if __name__ == "__main__":
    main()
