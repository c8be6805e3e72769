"""Config of the trainer (``rlbus trainer``, section ``[trainer]``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from rlbus.config import ConfigModel, ServiceConfig


class OptimizerConfig(ConfigModel):
    """AdamW settings."""

    lr: float = Field(1e-6, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment coefficients."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm."""


class SchedulerConfig(ConfigModel):
    """Learning-rate schedule."""

    type: Literal["constant", "linear", "cosine"] = "constant"
    """Shape after warmup: constant, linear decay or cosine decay."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to the peak learning rate."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak (linear and cosine)."""


class LossConfig(ConfigModel):
    """RL objective."""

    type: Literal["masked_is", "ppo", "gspo", "cispo", "pg"] = "masked_is"
    """masked_is: probability-difference masked importance sampling (default); ppo: clipped
    ratio; gspo: sequence-level ratio; cispo: clipped IS weight; pg: on-policy policy gradient."""
    mask_threshold: float = Field(0.2, gt=0)
    """masked_is: tokens whose probability moved more than this in the advantage's direction are masked."""
    kl_coef: float = Field(1e-3, ge=0)
    """Weight of the squared log-ratio penalty."""
    clip_eps: float = Field(0.2, gt=0)
    """ppo/gspo/cispo: clipping range of the ratio."""


class CheckpointConfig(ConfigModel):
    """Checkpoints of model, optimizer, scheduler and progress."""

    enabled: bool = False
    """Write checkpoints at all."""
    interval: int = Field(50, ge=1)
    """Checkpoint every this many steps."""
    keep_last: int | None = Field(None, ge=1)
    """Keep only the newest N checkpoints; None keeps all."""
    keep_interval: int | None = Field(None, ge=1)
    """Also keep every checkpoint whose step is a multiple of this."""
    resume_step: int | None = Field(None, ge=-1)
    """Resume from this step; -1 is the latest; None starts fresh."""
    weights_only: bool = False
    """Save only the HF-format weights (``weights/step_N``), not the optimizer state and progress:
    smaller and faster, but a restarted trainer cannot resume from them (it stops with an error
    rather than start over)."""
    save_async: bool = False
    """Write checkpoints on a background thread: the trainer copies the state and goes on (RL:
    the write overlaps the weight broadcast to inference; SFT: the next steps), and waits for the
    write only where it must be on disk (before acknowledging the step's batch, at the end)."""


class TrainingConfig(ServiceConfig):
    """What RL training and SFT share: model dtype, optimizer, schedule, checkpoints."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter and compute dtype; use float32 on CPUs without bf16 units."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel of transformers; all of them keep packed samples apart."""
    row_layout: Literal["auto", "packed", "padded"] = "auto"
    """How a packed micro-batch runs through the model: ``packed`` as one sequence (samples kept apart
    by a block-diagonal mask), ``padded`` as a padded batch of its samples (attention then costs the
    sum of squared sample lengths, not the row length squared); ``auto`` is packed with
    flash_attention_2 (its varlen kernel skips cross-sample work) and padded otherwise."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """Optimizer settings."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Learning-rate schedule."""
    ckpt: CheckpointConfig = CheckpointConfig()
    """Checkpointing."""
    num_threads: int | None = Field(None, ge=1)
    """CPU threads of each rank's math (``torch.set_num_threads``); None keeps torch's default (one
    per core). Set it when the trainer shares the cores with a replica that generates at the same
    time (``max_async_level`` >= 1 on one machine): both sides spinning on every core made steps
    up to 10x slower on 2 cores; 1 here with ``inference.cpu_threads_bind = "0"`` keeps them apart."""
    peak_flops: float | None = Field(None, gt=0)
    """Peak FLOP/s per rank for MFU; None measures matmul throughput at start."""

    def padded_rows(self) -> bool:
        """Whether micro-batches run as padded batches of their samples (``row_layout``)."""
        return self.row_layout == "padded" or (
            self.row_layout == "auto" and self.attn_implementation != "flash_attention_2"
        )


class TrainerConfig(TrainingConfig):
    """The trainer applies the RL loss to packed batches and publishes new weights."""

    SERVICE: ClassVar[str] = "trainer"

    loss: LossConfig = LossConfig()
    """RL objective."""
    weight_bucket_mb: int = Field(64, ge=1)
    """Weights are streamed to inference in buckets of about this many MiB."""
    final_weights_timeout_s: float = Field(30.0, ge=0)
    """After the last step, keep serving weights until a replica fetched the last step's (so the
    run's final evaluation and late replicas see the trained policy), at most this long; skipped
    when no replica fetched weights during the run."""
    trainer_id: str = "trainer"
    """Name the trainer gives the orchestrator in every BatchRequest and BatchAck."""
