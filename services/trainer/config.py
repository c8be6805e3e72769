"""Config of the trainer (``rlbus trainer``, section ``[trainer]``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlbus.config import ConfigModel, ServiceConfig
from rlbus.services.trainer.lora_config import LoraConfig
from rlbus.weights_collective import parse_address


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
    save_adapter_separately: bool = False
    """With ``lora``: also write the raw PEFT adapter to ``weights/step_N/adapter``."""
    format: Literal["full", "sharded"] = "full"
    """``full``: rank 0 gathers model and optimizer and writes them alone (any number of ranks
    resumes; no shared filesystem needed). ``sharded``: every rank writes its own shards (torch
    DCP) into a folder all ranks share, nothing is gathered but the HF weights; resumes onto any
    number of ranks too (docs/scaling.md, Checkpoints)."""


class MemoryConfig(ConfigModel):
    """Trading compute for memory (docs/scaling.md, Memory)."""

    ac: int = Field(0, ge=0)
    """Activation checkpointing: recompute every k-th decoder layer's activations in the backward
    instead of keeping them (1 = every layer, 2 = every other one); 0 is off."""
    ac_offload: bool = False
    """Keep the activations that checkpointing saves in (pinned) host memory, not on the GPU."""
    micro_batch_size: int = Field(1, ge=1)
    """Packed rows (of up to ``seq_len`` tokens each) run through one forward/backward; gradients
    of the step's micro-batches are accumulated. More is faster on a GPU and costs memory."""
    offload_optimizer: bool = False
    """FSDP2 CPU offload: parameters, gradients and optimizer state live in host memory and AdamW
    runs on the CPU; needs 2 or more ranks on GPUs."""

    @model_validator(mode="after")
    def _offload_needs_ac(self) -> MemoryConfig:
        if self.ac_offload and not self.ac:
            raise ValueError("memory.ac_offload offloads checkpointed activations: set memory.ac >= 1 too")
        return self


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
    memory: MemoryConfig = MemoryConfig()
    """Activation checkpointing, micro-batches, offloading."""
    lora: LoraConfig | None = None
    """Train a LoRA adapter on a frozen base (docs/lora.md); None trains the full weights."""
    num_threads: int | None = Field(None, ge=1)
    """CPU threads of each rank's math (``torch.set_num_threads``); None keeps torch's default (one
    per core). Set it when the trainer shares the cores with a replica that generates at the same
    time (``max_async_level`` >= 1 on one machine): both sides spinning on every core made steps
    up to 10x slower on 2 cores; 1 here with ``inference.cpu_threads_bind = "0"`` keeps them apart."""
    compile: bool = False
    """Run the model's decoder layers torch.compile'd (``dynamic=True``: one graph for every batch
    shape): inductor fuses the elementwise kernels (norms, rotary embeddings, activations) that took a
    quarter of a CPU step. Measured on 2 cores with the quickstart's model: forward/backward on one
    thread 0.93 -> 0.81-0.84 s a step (scripts/bench/trainer.py's batches); in ``rlbus rl``,
    0.63-0.66 -> 0.58-0.60 s on both cores. Costs a compile at start (~18 s the first time, ~5 s
    from inductor's cache, which is per thread count), run on a low-priority thread while the trainer
    waits for its first batch (services/trainer/compile.py). One rank only, for now."""
    peak_flops: float | None = Field(None, gt=0)
    """Peak FLOP/s per rank for MFU; None measures matmul throughput at start."""
    num_ranks: int = Field(1, ge=1)
    """Ranks on this node (FSDP2; gloo on a CPU), started by the command itself: no ``torchrun``
    needed (docs/scaling.md). ``rlbus rl`` sets it from ``trainer_gpu_ids``."""

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
    weight_delta: bool = False
    """Send replicas that hold the previous step only what changed: each tensor as a zstd-compressed
    XOR against it when that is smaller, checked by checksum after reconstruction; a replica on an
    older step gets full tensors. Costs the trainer one more step of weights in memory and the
    replica one more copy; pays off when the link, not the CPU, is the limit (docs/inference.md)."""
    final_weights_timeout_s: float = Field(30.0, ge=0)
    """After the last step, keep serving weights until a replica fetched the last step's (so the
    run's final evaluation and late replicas see the trained policy), at most this long; skipped
    when no replica fetched weights during the run."""
    weight_transport: Literal["bus", "collective"] = "bus"
    """How replicas get each step: ``bus`` (default): they fetch it from the trainer over the bus,
    any network, replicas may come and go. ``collective``: rank 0 also broadcasts every full-weight
    step to a fixed set of ``weight_group_replicas`` replicas in a process group of their own (NCCL
    on GPUs that share a fabric, gloo on CPUs); each replica checks it against the manifest and
    falls back to the bus when that fails. LoRA adapter steps always travel over the bus
    (docs/inference.md#collective-weight-transport)."""
    weight_group_address: str | None = None
    """``collective``: ``host:port`` where the trainer binds the group's rendezvous store (a
    TCPStore, unauthenticated: a trusted network only); replicas set the same address. ``rlbus rl``
    makes it ``127.0.0.1:29650`` when unset and hands it to the replicas it starts."""
    weight_group_replicas: int = Field(1, ge=1)
    """``collective``: how many replicas (ranks 1..N) the group waits for; it forms only once all
    joined; until then steps travel over the bus. ``rlbus rl``: every replica it starts."""
    weight_group_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``collective``: ``nccl`` (GPU buffers, GPUs on one fabric), ``gloo`` (host buffers, TCP),
    ``auto``: nccl where CUDA is available, else gloo. Replicas must use the same."""
    weight_group_timeout_s: float = Field(60.0, gt=0)
    """``collective``: how long forming the group or one bucket's broadcast may take; past it the
    trainer drops the group (a timed-out collective cannot be reused), the step's replicas fetch it
    over the bus, and the trainer forms a new group generation in the background."""
    trainer_id: str = "trainer"
    """Name the trainer gives the orchestrator in every BatchRequest and BatchAck."""
    max_concurrent_runs: int | None = Field(None, ge=1)
    """Train up to this many runs at once, each on its own LoRA adapter of the shared base with the
    optimizer, schedule, loss and max_steps its orchestrator sends when joining at
    ``bus.endpoints.trainer_runs`` (this config's are not used), and its own checkpoints
    (``runs/<run_id>/checkpoints``, with ``ckpt.enabled``). None trains one run. Set, ``lora``,
    ``max_steps`` and ``memory.ac`` must be unset and ``num_ranks`` 1."""
    run_idle_evict_s: float | None = Field(600.0, gt=0)
    """With ``max_concurrent_runs``: when a run joins while every slot is taken, the run whose
    orchestrator has not delivered the batch asked of it for this long (killed for good, say: it
    never sends RunLeave) gives up its slot, checkpointed first with ``ckpt.enabled``; it can join
    again later like any run. None: a slot is freed only by its run leaving."""

    @model_validator(mode="after")
    def _weight_group_is_set(self) -> TrainerConfig:
        if self.weight_transport != "collective":
            return self
        if self.weight_group_address is None:
            raise ValueError("weight_transport = \"collective\" needs weight_group_address (host:port the "
                             "trainer binds for the replicas' weight group)")  # fmt: skip
        parse_address(self.weight_group_address)
        if self.max_concurrent_runs is not None:
            raise ValueError("weight_transport = \"collective\" with max_concurrent_runs is not supported: a "
                             "shared trainer publishes adapters, which travel over the bus")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _shared_trainer_fits(self) -> TrainerConfig:
        if self.max_concurrent_runs is None:
            return self
        if self.lora is not None:
            raise ValueError("max_concurrent_runs trains each run's own adapter from the LoRA settings its "
                             "orchestrator sends: remove [trainer.lora]")  # fmt: skip
        if self.max_steps is not None:
            raise ValueError("max_concurrent_runs: max_steps means nothing for a shared trainer (each run has "
                             "its own); remove it")  # fmt: skip
        if self.memory.ac:
            raise ValueError("max_concurrent_runs with memory.ac is not supported yet (as for lora): set "
                             "memory.ac = 0")  # fmt: skip
        if self.num_ranks > 1:
            raise ValueError(f"max_concurrent_runs with num_ranks = {self.num_ranks} is not supported yet: a "
                             "shared trainer runs on one rank")  # fmt: skip
        if self.compile:
            raise ValueError("max_concurrent_runs with compile is not supported yet (the runs' adapters come "
                             "and go): set compile = false")  # fmt: skip
        return self
