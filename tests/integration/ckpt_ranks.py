"""Run under torchrun by test_checkpoint_ranks.py: N ranks train step 1 (FSDP2, activation
checkpointing on), save it sharded and in the background, train step 2 while the write runs, and
leave what the test compares a resumed single rank against.

    python -m torch.distributed.run --nproc-per-node 2 tests/integration/ckpt_ranks.py MODEL_DIR OUT_DIR

Writes, from rank 0: ``OUT_DIR/expected_step1.pt`` (the gathered model and optimizer state of step
1) and ``OUT_DIR/losses.json`` (the loss of steps 1 and 2, uninterrupted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rlbus.services.trainer.checkpoint import CheckpointManager, _full_optimizer_state
from rlbus.services.trainer.ckpt_writer import detached_copy
from rlbus.services.trainer.config import CheckpointConfig, LossConfig, OptimizerConfig, SchedulerConfig
from rlbus.services.trainer.distributed import DistContext, init_distributed, shard_model, shutdown_distributed
from rlbus.services.trainer.logprobs import RowTensors
from rlbus.services.trainer.model import enable_activation_checkpointing, full_state_dict, load_model
from rlbus.services.trainer.schedule import LRSchedule
from rlbus.services.trainer.train_step import TrainStep, build_optimizer
from tests.unit.trainer.batches import train_batch

LR = 1e-3
NUM_MICRO_BATCHES = 4


def build(model_dir: str, ctx: DistContext, ac: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainStep]:
    """Model, optimizer and step as the trainer builds them (``build_runtime``, without the config)."""
    torch.manual_seed(0)
    model = load_model(model_dir, "float32", ctx.device)
    enable_activation_checkpointing(model, ac)
    model = shard_model(model, ctx)
    optimizer = build_optimizer(model, OptimizerConfig(lr=LR))
    schedule = LRSchedule(LR, SchedulerConfig(), None)
    return model, optimizer, TrainStep(model, optimizer, schedule, ctx, 1.0, LossConfig(), peak_flops=1e11)


def share(step: int, ctx: DistContext) -> tuple[list[RowTensors], int]:
    """This rank's micro-batches of ``step`` (rank r gets r, r + N, ...) and the step's loss tokens."""
    batch = train_batch(step, ctx.rank, ctx.world_size, num_micro_batches=NUM_MICRO_BATCHES)
    return [RowTensors.from_message(m, ctx.device) for m in batch.micro_batches], batch.num_loss_tokens


def main(model_dir: str, out: Path) -> None:
    ctx = init_distributed()
    model, optimizer, trainer = build(model_dir, ctx, ac=1)
    losses = {1: trainer.run(1, *share(1, ctx))["loss/mean"]}
    # Copies: the gathered state holds live tensors (AdamW's step counts) that step 2 changes.
    expected = detached_copy({"model": full_state_dict(model), "optimizer": _full_optimizer_state(model, optimizer)})
    ckpt = CheckpointManager(out, CheckpointConfig(enabled=True, format="sharded", save_async=True), ctx)
    ckpt.save(1, model, optimizer, None, {"marker": "ranks"})
    losses[2] = trainer.run(2, *share(2, ctx))["loss/mean"]  # while the shards are written
    ckpt.wait()
    ckpt.writer.close()
    if ctx.is_main:
        torch.save(expected, out / "expected_step1.pt")
        (out / "losses.json").write_text(json.dumps(losses))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
