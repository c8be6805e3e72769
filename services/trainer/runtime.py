"""What RL training and SFT set up the same way: ranks, model, optimizer, resume.

Heavy imports (torch, transformers) happen here, after the config was parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger

from rlbus.services.trainer.checkpoint import CheckpointManager
from rlbus.services.trainer.compile import CompileWarmup, compile_model
from rlbus.services.trainer.config import LossConfig, TrainingConfig
from rlbus.services.trainer.distributed import DistContext, init_distributed, shard_model
from rlbus.services.trainer.lora import with_lora
from rlbus.services.trainer.model import TORCH_DTYPES, enable_activation_checkpointing, load_model, load_tokenizer
from rlbus.services.trainer.perf import measure_peak_flops
from rlbus.services.trainer.schedule import LRSchedule
from rlbus.services.trainer.train_step import TrainStep, build_optimizer


@dataclass
class Runtime:
    ctx: DistContext
    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    trainer: TrainStep
    ckpt: CheckpointManager
    start_step: int = 0
    """Last step already trained (0 on a fresh start, N after resuming from step N)."""
    progress: dict[str, Any] = field(default_factory=dict)
    """What the resumed checkpoint recorded besides the weights."""

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def save(self, step: int, progress: dict[str, Any] | None = None, weights_only: bool | None = None) -> None:
        self.ckpt.save(step, self.model, self.optimizer, self.tokenizer, progress or {}, weights_only)


def build_runtime(config: TrainingConfig, loss: LossConfig | None, total_steps: int | None) -> Runtime:
    """Join the ranks, load and shard the model, build the optimizer, resume if asked.

    ``loss`` None means SFT; ``total_steps`` is what the schedule decays towards.
    """
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    ctx = init_distributed()
    torch.manual_seed(config.seed)
    model = load_model(config.model, config.dtype, ctx.device, config.attn_implementation)
    model = with_lora(model, config.lora, ctx.world_size, config.memory.ac)
    enable_activation_checkpointing(model, config.memory.ac, config.memory.ac_offload)  # before FSDP2 wraps
    model = shard_model(model, ctx, config.memory.offload_optimizer)
    tokenizer = load_tokenizer(config.model)
    optimizer = build_optimizer(model, config.optimizer)
    schedule = LRSchedule(config.optimizer.lr, config.scheduler, total_steps)
    peak_flops = config.peak_flops or measure_peak_flops(ctx.device, TORCH_DTYPES[config.dtype])
    if ctx.is_main:
        logger.info("loaded {} ({:,} parameters, {}) on {} rank(s); peak {:.1f} GFLOP/s per rank{}",
                    config.model, sum(p.numel() for p in model.parameters()), config.dtype, ctx.world_size,
                    peak_flops / 1e9, "" if config.peak_flops else " (measured)")  # fmt: skip
    ckpt = CheckpointManager(config.output_dir, config.ckpt, ctx)
    ckpt.lora = config.lora
    if ctx.is_main:
        ckpt.remove_partials()
    resume = ckpt.resume_step()
    progress = ckpt.load(resume, model, optimizer) if resume is not None else {}
    # After resuming: the warm-up's forward must not overlap a load into the same parameters.
    warmup = start_compile(model, config, ctx)
    trainer = TrainStep(
        model, optimizer, schedule, ctx, config.optimizer.max_grad_norm, loss, peak_flops, config.padded_rows(),
        config.memory.micro_batch_size, warmup,
    )
    return Runtime(ctx=ctx, model=model, tokenizer=tokenizer, optimizer=optimizer, trainer=trainer, ckpt=ckpt,
                   start_step=resume or 0, progress=progress)  # fmt: skip


def start_compile(model: torch.nn.Module, config: TrainingConfig, ctx: DistContext) -> CompileWarmup | None:
    """``trainer.compile``: compile ``model`` and start its warm-up (services/trainer/compile.py)."""
    if not config.compile:
        return None
    if ctx.world_size > 1:
        raise ValueError(f"trainer.compile runs one rank only for now, and this trainer has {ctx.world_size}: "
                         "set trainer.compile = false")  # fmt: skip
    compile_model(model)
    return CompileWarmup(model, config.padded_rows(), ctx.device).start()
