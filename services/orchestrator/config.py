"""Config of the orchestrator (``rlbus orchestrator``, section ``[orchestrator]``)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from rlbus.config import ConfigModel, ServiceConfig
from rlbus.environments.registry import SERVER_ADDRESS_ARG, checked_server_address
from rlbus.teacher import TEACHER_MODES, TeacherClientConfig, TrainingMode

Scalar = str | int | float | bool
# Prefixes whose loaders run an environment on a server of its own (``server_address``).
SERVED_PREFIXES = ("verifiers:",)


class EnvSource(ConfigModel):
    """Which environment, with which arguments, and where it runs (shared by train and eval specs)."""

    id: str
    """Environment name, as registered in the ``rlbus.environments`` entry point group."""
    args: dict[str, Scalar] = {}
    """Keyword arguments passed to the environment's loader."""
    server_address: str | None = None
    """ZeroMQ address (``tcp://host:port`` or ``ipc://path``) of a running verifiers env server
    (``verifiers.v1.serve``) that runs this ``verifiers:`` environment's episodes; env-workers send it
    each task and serve its model calls token-in/token-out. None runs the environment inside the
    env-workers. See docs/environments.md, "Env servers"."""

    @field_validator("server_address")
    @classmethod
    def _connectable(cls, value: str | None) -> str | None:
        return None if value is None else checked_server_address(value)

    @model_validator(mode="after")
    def _served_by_its_loader(self) -> EnvSource:
        if self.server_address is not None and not self.id.startswith(SERVED_PREFIXES):
            raise ValueError(f"environment {self.id!r}: server_address {self.server_address!r} needs an environment "
                             f"that runs on an env server, with an id starting {' or '.join(SERVED_PREFIXES)}")
        if SERVER_ADDRESS_ARG in self.args:
            raise ValueError(f"environment {self.id!r}: give the env server as `server_address` next to `args`, "
                             f"not as args.{SERVER_ADDRESS_ARG}")  # fmt: skip
        return self

    @property
    def loader_args(self) -> dict[str, Scalar]:
        """What the environment's loader gets (and tasks carry): ``args`` plus the server address."""
        if self.server_address is None:
            return dict(self.args)
        return {**self.args, SERVER_ADDRESS_ARG: self.server_address}


class EnvSpec(EnvSource):
    """One training environment (``[[orchestrator.train.env]]``)."""

    ratio: float = Field(1.0, gt=0)
    """Relative share of tasks drawn from this environment."""


class EvalEnvSpec(EnvSource):
    """One evaluation environment (``[[orchestrator.eval.env]]``)."""

    num_examples: int = Field(32, ge=1)
    """Examples evaluated per evaluation."""
    rollouts_per_example: int = Field(1, ge=1)
    """k of avg@k and pass@k."""
    temperature: float | None = Field(None, ge=0)
    """Sampling temperature of this evaluation; 0 is greedy (with ``rollouts_per_example = 1``: the
    greedy avg@1); None samples as training does (``sampling.temperature``)."""
    name: str | None = None
    """Name in the metrics (``eval/<name>/avg@k``); None uses ``id``. Give one to evaluate the same
    environment twice, e.g. greedily and sampled."""

    @property
    def metric_name(self) -> str:
        return self.name or self.id


class TrainEnvsConfig(ConfigModel):
    """Environments rollouts are trained on."""

    env: list[EnvSpec] = [EnvSpec(id="reverse-text")]
    """Training environments, sampled by ``ratio``."""


class EvalConfig(ConfigModel):
    """Periodic evaluation at the current policy, outside training."""

    interval: int | None = Field(None, ge=1)
    """Evaluate every policy step that is a multiple of this (0 included: the base model);
    None disables evaluation."""
    env: list[EvalEnvSpec] = []
    """Evaluation environments."""
    pass_threshold: float = 1.0
    """A rollout counts as solved for pass@k when its reward is at least this."""
    final_timeout_s: float = Field(120.0, ge=0)
    """The last policy (``max_steps``) is always evaluated: once every step is trained, wait this long
    at most for inference to serve it, then finish without that evaluation (a warning says so)."""

    @model_validator(mode="after")
    def _one_name_per_evaluation(self) -> EvalConfig:
        names = [spec.metric_name for spec in self.env]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"eval.env: {twice} evaluated more than once under the same name; give each "
                             "evaluation of the same environment its own `name` (its metrics are eval/<name>/...)")
        return self


class SamplingConfig(ConfigModel):
    """How completions are sampled for training."""

    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; the trainer divides its logits by the same value."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_tokens: int = Field(128, ge=1)
    """Completion tokens per model turn."""


class AdvantageConfig(ConfigModel):
    """How rewards become advantages within a group."""

    std_normalize: bool = False
    """Divide by the group's reward standard deviation."""
    leave_one_out: bool = False
    """Use the mean of the other rollouts of the group as the baseline (RLOO)."""
    length_penalty: float = Field(0.0, ge=0)
    """Subtract this times the length fraction from each reward before the baseline: completion
    tokens / (``sampling.max_tokens`` x turns), so 1.0 costs a rollout that used every token."""


class ProgressCheckpointConfig(ConfigModel):
    """The orchestrator's progress checkpoint (step, counters, sampler position)."""

    interval: int = Field(50, ge=1)
    """Write progress when the trainer acknowledges a step whose count of trained steps is a
    multiple of this; set it to ``trainer.ckpt.interval`` so both resume from the same step."""
    resume_step: int | None = Field(None, ge=-1)
    """Resume from the progress written at this step; -1 is the latest; None starts fresh."""
    keep_last: int = Field(3, ge=1)
    """Progress files kept; older ones are deleted."""


class TeacherConfig(ConfigModel):
    """The teacher of ``training_mode = "opd"`` or ``"sft"`` (docs/training.md). Start it yourself
    before the run: ``rlbus rl`` starts only the student's inference."""

    client: TeacherClientConfig
    """Where the teacher serves; env-workers get the same settings as ``[env_worker.teacher]``."""
    reward_weight: float = Field(0.0, ge=0)
    """``opd``: add this times the rollout's group advantage (from the reward) to each token's
    teacher-minus-student advantage; 0 distills from the teacher alone."""
    reward_threshold: float | None = None
    """``sft``: train only on teacher rollouts with at least this reward; None keeps all."""


class SharedTrainerJoinConfig(ConfigModel):
    """Train this run on a shared trainer (``rlbus trainer`` with ``max_concurrent_runs``): the
    orchestrator joins it with ``RunJoin`` and leaves with ``RunLeave`` when done (docs/lora.md)."""

    runs_address: str = Field(min_length=1)
    """The shared trainer's ``bus.endpoints.trainer_runs`` (its ROUTER for joining runs)."""
    run_id: str = Field(min_length=1)
    """This run's name on the trainer: its adapter's name, checkpoint folder and metrics tag."""
    spec: dict[str, Any]
    """The run's ``RunSpec`` as JSON (lora, optimizer, scheduler, loss, max_steps, seed), which the
    trainer validates; ``rlbus rl`` builds it from the run's ``[trainer.*]`` sections."""

    @model_validator(mode="after")
    def _spec_names_this_run(self) -> SharedTrainerJoinConfig:
        named = self.spec.get("run_id", self.run_id)
        if named != self.run_id:
            raise ValueError(f"shared_trainer.spec.run_id = {named!r} but shared_trainer.run_id = {self.run_id!r}: "
                             "they name the same run; drop spec.run_id or make them equal")  # fmt: skip
        self.spec.setdefault("run_id", self.run_id)
        return self


class OrchestratorConfig(ServiceConfig):
    """The orchestrator hands tasks to env-workers, turns scored rollouts into
    training batches and keeps sampling within the staleness bounds."""

    SERVICE: ClassVar[str] = "orchestrator"

    batch_size: int = Field(128, ge=1)
    """Rollouts per training step (examples x rollouts_per_example)."""
    rollouts_per_example: int = Field(16, ge=1)
    """Group size: rollouts of one example whose rewards are compared."""
    seq_len: int = Field(2048, ge=16)
    """Tokens per packed micro-batch row."""
    max_async_level: int = Field(1, ge=0)
    """How many steps the orchestrator may run ahead of the policy step inference serves."""
    max_off_policy_steps: int = Field(8, ge=0)
    """Rollouts sampled by a policy this many steps older than the batch's step are discarded."""
    task_lease_s: float = Field(600.0, gt=0)
    """A task whose result has not arrived after this many seconds is issued again."""
    max_task_issues: int = Field(3, ge=1)
    """A task is issued at most this many times: one whose result never arrives (lease expired,
    worker gone) or never decodes that often is abandoned, counted (``dropped/abandoned_tasks``,
    event ``task_abandoned``) and replaced by a fresh draw, so one poison example cannot stall a run."""
    worker_timeout_s: float = Field(30.0, gt=0)
    """An env-worker not heard from for this long (they send a keepalive every
    ``bus.heartbeat_interval_s``) is taken for dead and its leased tasks are issued again."""
    trainer_world_size: int = Field(1, ge=1)
    """Trainer ranks each batch is split across."""
    samples_interval: int = Field(1, ge=1)
    """Send rollout samples to the monitor every this many steps."""
    samples_per_report: int = Field(8, ge=1)
    """Rollouts (prompt, completion, reward, advantage) in each samples report."""
    sampling: SamplingConfig = SamplingConfig()
    """Sampling settings of training rollouts."""
    advantage: AdvantageConfig = AdvantageConfig()
    """Advantage computation."""
    train: TrainEnvsConfig = TrainEnvsConfig()
    """Training environments."""
    eval: EvalConfig = EvalConfig()
    """Evaluation environments and interval."""
    ckpt: ProgressCheckpointConfig = ProgressCheckpointConfig()
    """Progress checkpoints, written on the trainer's checkpoint steps."""
    training_mode: TrainingMode = "rl"
    """``rl``: learn from the reward; ``opd``: on-policy distillation (the student samples, the
    teacher scores each token); ``sft``: the teacher samples, the student imitates. docs/training.md."""
    teacher: TeacherConfig | None = None
    """The teacher of ``opd`` and ``sft``; None in ``rl``."""
    shared_trainer: SharedTrainerJoinConfig | None = None
    """Join a shared trainer as one of its runs (``rlbus rl`` sets it from ``[shared_trainer]``);
    None: a trainer of this run's own pulls the batches, as usual."""

    @model_validator(mode="after")
    def _teacher_fits_the_mode(self) -> OrchestratorConfig:
        mode, teacher = self.training_mode, self.teacher
        if mode in TEACHER_MODES and teacher is None:
            raise ValueError(f"training_mode = {mode!r} needs a teacher: set [orchestrator.teacher.client] base_url "
                             "and model (opd: a vLLM server with the student's tokenizer, e.g. a second "
                             "`rlbus inference`; sft: any OpenAI-compatible API); see docs/training.md")  # fmt: skip
        if mode == "rl" and teacher is not None:
            raise ValueError(f"[orchestrator.teacher] is set ({teacher.client.base_url}) but training_mode = 'rl' "
                             "never asks it: set training_mode = 'opd' or 'sft', or remove the teacher")  # fmt: skip
        # By value, not by "was it set": a resolved config file holds every default.
        misplaced = {"opd": ("reward_threshold", None), "sft": ("reward_weight", 0.0)}.get(mode)
        if teacher is not None and misplaced is not None and getattr(teacher, misplaced[0]) != misplaced[1]:
            raise ValueError(f"teacher.{misplaced[0]} = {getattr(teacher, misplaced[0])} is not used with training_mode "
                             f"= {mode!r} (reward_weight is for opd, reward_threshold for sft)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _batch_holds_whole_groups(self) -> OrchestratorConfig:
        if self.batch_size % self.rollouts_per_example:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of rollouts_per_example "
                f"({self.rollouts_per_example}) so every batch holds whole groups"
            )
        return self
