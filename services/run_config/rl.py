"""The merged ``rl`` config: shared fields at the top, one section per service.

Shared fields (model, output_dir, max_steps, seed, bus, log) are set once at
the top level and propagate into every section; a section that sets one to
a different value is an error, so services can never disagree about them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from rlbus.bench import MIN_RL_BENCH_STEPS, bench_steps
from rlbus.config import ConfigModel, ServiceConfig, deep_merge, env_values
from rlbus.services.env_worker.config import EnvWorkerConfig
from rlbus.services.inference.config import InferenceConfig
from rlbus.services.monitor.config import MonitorConfig, PrimePlatformConfig
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.run_config.shared_trainer import SharedTrainerConfig, join_shared_trainer
from rlbus.services.run_config.short import expand_short_keys, short_keys
from rlbus.services.run_config.slurm import SlurmConfig
from rlbus.services.trainer.config import TrainerConfig

RUN_MARKER = ".rlbus-run"
"""File that every rlbus command writes into its ``output_dir``: ``--clean-output-dir`` deletes
only folders that hold it (or are empty), never one that was named by mistake."""

SECTIONS: dict[str, type[ServiceConfig]] = {
    "inference": InferenceConfig,
    "trainer": TrainerConfig,
    "orchestrator": OrchestratorConfig,
    "env_worker": EnvWorkerConfig,
    "monitor": MonitorConfig,
}


class RunCheckpointConfig(ConfigModel):
    """Checkpoints of the whole run: the trainer's and the orchestrator's, at the same steps."""

    interval: int | None = Field(1, ge=1)
    """Trainer and orchestrator checkpoint every this many steps (enables the trainer's
    checkpoints and sets ``trainer.ckpt.interval`` and ``orchestrator.ckpt.interval``, unless a
    section sets its own); None leaves both sections as they are. A restarted trainer repeats the
    steps after its last checkpoint with the same batches, so a larger interval costs recovery time."""
    keep_last: int | None = Field(3, ge=1)
    """Checkpoints kept by the trainer and progress files kept by the orchestrator (unless a
    section sets its own); raise it to be able to resume further back; None keeps every one."""
    keep_interval: int | None = Field(None, ge=1)
    """The trainer also keeps every checkpoint whose step is a multiple of this (sets
    ``trainer.ckpt.keep_interval`` unless the section sets its own); None keeps only ``keep_last``."""
    weights_only: bool | None = None
    """The trainer saves only the HF weights, no optimizer state (sets ``trainer.ckpt.weights_only``
    unless the section sets its own): smaller and faster, but a run whose trainer is restarted
    cannot resume (prime-rl's ``--ckpt.weights-only``). None leaves the trainer's setting."""
    save_async: bool | None = None
    """The trainer writes checkpoints on a background thread (sets ``trainer.ckpt.save_async``
    unless the section sets its own; prime-rl's ``--ckpt.save-async``). None leaves the trainer's setting."""
    format: Literal["full", "sharded"] | None = None
    """How the trainer writes model and optimizer (sets ``trainer.ckpt.format`` unless the section
    sets its own): ``full`` (rank 0 gathers them) or ``sharded`` (every rank its own shards, torch DCP;
    docs/scaling.md, Checkpoints). None leaves the trainer's setting."""
    resume_step: int | None = Field(-1, ge=-1)
    """Every service resumes from this step's checkpoints (metrics continue from the next step);
    -1 resumes from the latest, and starts fresh when the run folder holds none, so a service
    restarted with its own command picks up where the run is; None always starts fresh."""


class RlConfig(ServiceConfig):
    """Everything ``rlbus rl`` needs to start all five services locally."""

    SERVICE: ClassVar[str] = "rl"
    HELP_HIDDEN: ClassVar[tuple[str, ...]] = ("monitor.prime_platform", "env_worker.teacher",
                                              "orchestrator.shared_trainer")  # fmt: skip
    """Keys ``--help`` leaves out: the top-level ``prime_platform``, ``orchestrator.teacher.client``
    and ``shared_trainer`` set them."""

    inference: InferenceConfig = InferenceConfig()
    """Inference replica settings."""
    trainer: TrainerConfig = TrainerConfig()
    """Trainer settings."""
    orchestrator: OrchestratorConfig = OrchestratorConfig()
    """Orchestrator settings."""
    env_worker: EnvWorkerConfig = EnvWorkerConfig()
    """Env-worker settings (shared by every env-worker process)."""
    monitor: MonitorConfig = MonitorConfig()
    """Monitor settings."""
    num_env_workers: int = Field(1, ge=1)
    """Env-worker processes to start."""
    inference_gpu_ids: list[int] | list[list[int]] | None = None
    """GPUs of inference, by index on this machine (docs/scaling.md): one replica per group, on
    ``inference.port + i``, seeing only its group; env-workers use them all. A flat list is cut into
    groups of ``inference.tensor_parallel_size``; a list of lists names the groups and sets it. None:
    one replica that sees what the launcher sees."""
    trainer_gpu_ids: list[int] | None = None
    """GPUs of the trainer, by index on this machine: one rank per GPU (sets ``trainer.num_ranks``),
    seeing only these. May share inference GPUs if ``inference.gpu_memory_utilization +
    trainer_gpu_memory_fraction`` <= 1. None: the trainer sees what the launcher sees."""
    trainer_gpu_memory_fraction: float = Field(0.5, gt=0, lt=1)
    """Part of a GPU shared with inference that the trainer needs; checked before start against
    ``inference.gpu_memory_utilization`` (vLLM takes exactly that part), not enforced."""
    clean_output_dir: bool = False
    """Delete output_dir before starting (otherwise an existing run folder is reused and
    services resume from its checkpoints)."""
    stop_timeout_s: float = Field(30.0, gt=0)
    """When stopping, how long each service gets after SIGTERM before it is killed."""
    slurm: SlurmConfig = SlurmConfig()
    """Running the services as SLURM job arrays (``--slurm``; docs/slurm.md)."""
    max_restarts: int = Field(0, ge=0)
    """Restart a service that dies (killed, or a non-zero exit) with the same command, up to this
    many times per service, instead of stopping the run; 0 stops the run at the first failure."""
    ckpt: RunCheckpointConfig = RunCheckpointConfig()
    """Checkpoint interval and resume step of the trainer and the orchestrator together."""
    prime_platform: PrimePlatformConfig | None = None
    """Stream the run to the Prime platform's dashboard (docs/platform.md): a ``[prime_platform]``
    section (even an empty one), any ``--prime_platform.*`` flag, or the bare flag
    ``--orchestrator.prime-monitor`` enables it; it becomes ``monitor.prime_platform``. None: off."""
    shared_trainer: SharedTrainerConfig | None = None
    """Train on a shared trainer started by itself (``rlbus trainer`` with ``max_concurrent_runs``):
    the launcher starts no trainer, the orchestrator joins that one with the run's ``[trainer.lora]``,
    optimizer, scheduler and loss, the replica serves the run's adapter (docs/lora.md). None: the
    run starts its own trainer."""
    bench: bool = False
    """Benchmark mode (``--bench``): run the real loop for 5 steps (``max_steps`` when smaller, at
    least 3: the first is warm-up) with W&B, checkpoints, resuming and evaluation off (and the
    learning-rate warmup cut to the steps run), then print step time, trainer and generation
    tokens/s, MFU and peak memory per step and as mean ± std over the steps after the first. Needs
    a run folder without a run in it (or ``--clean-output-dir``)."""

    # The short config of Prime's hosted RL (services/run_config/short.py), for the loader.
    short_keys = staticmethod(short_keys)
    expand_short_keys = staticmethod(expand_short_keys)

    @model_validator(mode="before")
    @classmethod
    def _local_weight_group(cls, values: Any) -> Any:
        # Before the trainer's section validates: it refuses the collective transport without an address.
        from rlbus.services.run_config.weight_group import with_local_address

        return with_local_address(values)

    @model_validator(mode="after")
    def _bench_mode(self) -> RlConfig:
        # First of the validators: the ones below propagate max_steps and the run's ckpt settings
        # into the sections. Values are set through __dict__, as there: assignment would validate again.
        if not self.bench:
            return self
        self.__dict__["max_steps"] = bench_steps(self.max_steps)
        if self.max_steps < MIN_RL_BENCH_STEPS:
            raise ValueError(
                f"bench = true with max_steps = {self.max_steps}: the first step is warm-up and a "
                f"mean ± std needs two more; give --max-steps {MIN_RL_BENCH_STEPS} or more"
            )
        scheduler = self.trainer.scheduler
        if scheduler.warmup_steps > self.max_steps:  # refused at start; the rate does not change the speed
            scheduler.__dict__["warmup_steps"] = self.max_steps
        self.ckpt.__dict__.update(interval=None, resume_step=None)
        self.trainer.ckpt.__dict__.update(enabled=False, resume_step=None)
        self.orchestrator.ckpt.__dict__["resume_step"] = None
        self.orchestrator.eval.__dict__["interval"] = None
        self.monitor.wandb.__dict__["enabled"] = False
        return self

    @model_validator(mode="after")
    def _propagate_shared_fields(self) -> RlConfig:
        conflicts = []
        for name in SECTIONS:
            section = getattr(self, name)
            for field in self.SHARED_FIELDS:
                value = getattr(self, field)
                if field in section.model_fields_set and getattr(section, field) != value:
                    conflicts.append(f"{name}.{field} = {_show(getattr(section, field))} but {field} = {_show(value)}")
                # Bypass assignment validation: the value was validated at the top level.
                section.__dict__[field] = value
        if conflicts:
            raise ValueError(
                "shared fields are set once at the top level; these sections disagree: " + "; ".join(conflicts)
            )
        return self

    @model_validator(mode="after")
    def _platform_in_monitor(self) -> RlConfig:
        # The monitor streams, so the settings travel in its resolved config; one value for both places.
        top, own = self.prime_platform, self.monitor.prime_platform
        if top is not None and own is not None and "prime_platform" in self.monitor.model_fields_set and top != own:
            raise ValueError(
                f"prime_platform = {_show(top)} but monitor.prime_platform = {_show(own)}: set [prime_platform] only"
            )
        if top is not None:
            self.monitor.__dict__["prime_platform"] = top
        elif own is not None:
            self.__dict__["prime_platform"] = own
        return self

    @model_validator(mode="after")
    def _checkpoint_together(self) -> RlConfig:
        # Trainer and orchestrator must checkpoint and resume at the same steps: the orchestrator
        # keeps the batches after its last checkpoint for a trainer that restarts from the same one.
        trainer, orchestrator = self.trainer.ckpt, self.orchestrator.ckpt
        if self.ckpt.interval is not None:
            if "enabled" not in trainer.model_fields_set:
                trainer.__dict__["enabled"] = True
            for section in (trainer, orchestrator):
                if "interval" not in section.model_fields_set:
                    section.__dict__["interval"] = self.ckpt.interval
        for section in (trainer, orchestrator):
            if "resume_step" not in section.model_fields_set:
                section.__dict__["resume_step"] = self.ckpt.resume_step
        if self.ckpt.keep_interval is not None and "keep_interval" not in trainer.model_fields_set:
            trainer.__dict__["keep_interval"] = self.ckpt.keep_interval
        for name in ("weights_only", "save_async", "format"):
            value = getattr(self.ckpt, name)
            if value is not None and name not in trainer.model_fields_set:
                trainer.__dict__[name] = value
        if self.ckpt.keep_last is not None:
            for section in (trainer, orchestrator):
                if "keep_last" not in section.model_fields_set:
                    section.__dict__["keep_last"] = self.ckpt.keep_last
        if trainer.enabled and trainer.interval != orchestrator.interval:
            raise ValueError(
                f"trainer.ckpt.interval = {trainer.interval} but orchestrator.ckpt.interval = "
                f"{orchestrator.interval}: they must checkpoint at the same steps (set ckpt.interval)"
            )
        return self

    @model_validator(mode="after")
    def _placement(self) -> RlConfig:
        # GPU lists set the sizes they imply, unless a section sets its own (services/run_config/placement.py
        # reports the disagreements, with the other placement problems, before start).
        groups, ids = self.inference_gpu_ids, self.trainer_gpu_ids
        if groups and isinstance(groups[0], list) and "tensor_parallel_size" not in self.inference.model_fields_set:
            self.inference.__dict__["tensor_parallel_size"] = max(1, len(groups[0]))
        if ids and "num_ranks" not in self.trainer.model_fields_set:
            self.trainer.__dict__["num_ranks"] = len(ids)
        if "trainer_world_size" not in self.orchestrator.model_fields_set:
            from rlbus.services.run_config.placement import trainer_world_size

            self.orchestrator.__dict__["trainer_world_size"] = trainer_world_size(self)
        from rlbus.services.run_config.weight_group import size_the_group

        size_the_group(self)  # the collective transport's group holds every replica started
        return self

    @model_validator(mode="after")
    def _point_env_workers_at_local_inference(self) -> RlConfig:
        # Everything runs on this host: unless told otherwise, env-workers use the
        # replicas the launcher starts (one per GPU group, on consecutive ports), with their key.
        from rlbus.services.run_config.placement import num_inference_replicas

        worker, inference = self.env_worker, self.inference
        if "inference_urls" not in worker.model_fields_set:
            worker.__dict__["inference_urls"] = [f"http://{inference.host}:{inference.port + i}/v1"
                                                 for i in range(num_inference_replicas(self))]  # fmt: skip
        if worker.api_key is None and inference.api_key is not None:
            worker.__dict__["api_key"] = inference.api_key
        return self

    @model_validator(mode="after")
    def _join_the_shared_trainer(self) -> RlConfig:
        # Before _serve_the_adapter: the run id becomes the adapter's name, which it hands on.
        join_shared_trainer(self)
        return self

    @model_validator(mode="after")
    def _serve_the_adapter(self) -> RlConfig:
        # Only the adapter travels (docs/lora.md): replicas need LoRA on and a rank slot for it, wait
        # for it before serving, and env-workers name it in their requests. A section's own setting
        # stays; services/run_config/checks.py refuses the ones that cannot work.
        from rlbus.services.inference.config import lora_rank_slot

        lora, inference, worker = self.trainer.lora, self.inference, self.env_worker
        if lora is None or lora.transfer != "adapter":
            return self
        if "enable_lora" not in inference.model_fields_set:
            inference.__dict__["enable_lora"] = True
        if "max_lora_rank" not in inference.model_fields_set and inference.max_lora_rank < lora.rank:
            inference.__dict__["max_lora_rank"] = lora_rank_slot(lora.rank)
        if "await_adapter" not in inference.model_fields_set and inference.enable_lora:
            inference.__dict__["await_adapter"] = lora.name
        if "request_model" not in worker.model_fields_set:
            worker.__dict__["request_model"] = lora.name
        return self

    @model_validator(mode="after")
    def _teacher_for_env_workers(self) -> RlConfig:
        # Env-workers are the ones that ask the teacher (opd: scores, sft: answers); one setting for both.
        teacher = self.orchestrator.teacher
        if teacher is not None and "teacher" not in self.env_worker.model_fields_set:
            self.env_worker.__dict__["teacher"] = teacher.client
        return self

    @model_validator(mode="after")
    def _clean_only_a_run_folder(self) -> RlConfig:
        if self.clean_output_dir:
            check_cleanable(self.output_dir)
        return self

    def resolved_configs(self) -> dict[str, BaseModel]:
        """The merged config plus each service's own, loadable by ``rlbus <service> @ file``."""
        sections = {config.SERVICE: config for config in (getattr(self, name) for name in SECTIONS)}
        return {self.SERVICE: self, **sections}


def service_env(section: str | None, environ: Mapping[str, str]) -> dict[str, Any]:
    """Environment values for one service run alone, read with the ``rl`` schema.

    Checking every ``RLBUS_*`` variable against the merged schema catches typos
    while letting one environment (a compose ``.env``) serve every service: a
    service takes the shared fields and its own section and ignores the rest.
    """
    values = env_values(RlConfig, environ)
    wandb_key = environ.get("WANDB_API_KEY")
    if section is None and wandb_key:
        # Under files and flags (--wandb-api-key), as the short key expand_short_keys reads.
        values.setdefault("wandb_api_key", wandb_key)
    if section is None:
        return values
    if section == "monitor" and wandb_key and "api_key" not in values.get("monitor", {}).get("wandb", {}):
        values = deep_merge(values, {"monitor": {"wandb": {"api_key": wandb_key}}})
    shared = {key: value for key, value in values.items() if key in ServiceConfig.SHARED_FIELDS}
    own = values.get(section, {})
    inference_key = values.get("inference", {}).get("api_key")
    if section == "env_worker" and "api_key" not in own and inference_key is not None:
        # As RlConfig does: env-workers present the replicas' key unless given their own. Their
        # resolved file holds it redacted, so it must come from here.
        own = {**own, "api_key": inference_key}
    return deep_merge(shared, own)


def check_cleanable(output_dir: Path) -> None:
    """Refuse to delete a folder that is obviously not a run folder (``--clean-output-dir``)."""
    target, root = output_dir.resolve(), Path("/").resolve()
    protected = {root, Path.home().resolve(), Path.cwd().resolve()}
    if target in protected or any(target in p.parents for p in protected if p != root):
        raise ValueError(
            f"refusing to clean output_dir {str(output_dir)!r} (resolves to {target}): it is the filesystem root, "
            "the home or working directory, or one of their parents; pick a dedicated run folder"
        )
    if target.is_dir() and any(target.iterdir()) and not (target / RUN_MARKER).is_file():
        raise ValueError(
            f"refusing to clean output_dir {str(output_dir)!r}: it is not empty and holds no {RUN_MARKER} marker, so "
            f"rlbus did not make it; delete it yourself, or pick another --output-dir"
        )


def mark_run_folder(output_dir: Path) -> None:
    """Write the marker that lets ``--clean-output-dir`` delete ``output_dir`` later."""
    marker = output_dir / RUN_MARKER
    if not marker.is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text("rlbus run folder: --clean-output-dir may delete it\n")


def _show(value: Any) -> str:
    dump = getattr(value, "model_dump", None)
    return repr(dump(mode="json") if dump else value)
