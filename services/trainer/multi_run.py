"""Several runs, one trainer: one frozen base, one PEFT LoRA adapter per run (issue 22, part 2).

A :class:`RunTable` owns the base model, wrapped by PEFT at the first join, and per run an
adapter named by its run id, its own AdamW over only that adapter's parameters, its own
:class:`LRSchedule`, its own :class:`TrainStep` over the shared model, its own random state
(adapter init and dropout) and its last trained step. ``train`` makes the run's adapter the only
active and trainable one (PEFT ``set_adapter`` freezes every other adapter), so a step's forward
sees the base plus that adapter alone, its backward reaches that adapter alone, and its optimizer
holds nothing else: batches of different runs never share an optimizer step, and one run's
steps, failures or restarts leave every other run's adapter and optimizer state bit-identical.
``leave`` deletes the adapter (its memory goes with the run's optimizer); the same id may join
again and resume from its own checkpoint (multi_run_ckpt.py).

The loop that takes runs joining over the bus and routes each batch to its run is
``shared_loop.py``; :meth:`RunTable.adapter_tensors` gives the tensors in the names vLLM and
PEFT load. One trainer rank only, as for single-run LoRA.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from pydantic import Field, field_validator

from rlbus.config import ConfigModel
from rlbus.identity import run_id_problem
from rlbus.services.trainer.config import LossConfig, OptimizerConfig, SchedulerConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.logprobs import RowTensors
from rlbus.services.trainer.lora import base_fingerprint, check_targets, is_lora
from rlbus.services.trainer.lora_config import LoraConfig
from rlbus.services.trainer.multi_run_ckpt import adapter_params, file_name, load_run, save_run
from rlbus.services.trainer.schedule import LRSchedule
from rlbus.services.trainer.train_step import TrainStep, build_optimizer


class RunSpec(ConfigModel):
    """One run trained by a shared trainer: its adapter, optimizer, schedule and objective."""

    run_id: str
    """Names the run's adapter (in the trainer and on inference) and its checkpoint folder."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """The run's adapter."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """The run's AdamW (over its adapter only) and gradient clipping."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    """The run's learning-rate schedule."""
    loss: LossConfig | None = Field(default_factory=LossConfig)
    """The run's RL objective; None trains SFT (negative log-likelihood)."""
    max_steps: int | None = Field(None, ge=1)
    """The run's last step (what linear and cosine schedules decay towards); None: no limit."""
    base_sha256: str | None = None
    """The base model the run expects (``base_fingerprint``); None accepts the trainer's."""
    seed: int = 0
    """Seeds the run's own random state: adapter init and dropout, whatever other runs do."""

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, run_id: str) -> str:
        problem = run_id_problem(run_id)
        if problem:
            raise ValueError(f"run_id {run_id!r} cannot name an adapter and a folder: {problem}")
        return run_id


@dataclass
class StepSettings:
    """What every run's TrainStep shares: the trainer's rank, hardware and memory layout."""

    ctx: DistContext
    peak_flops: float
    padded_rows: bool = False
    micro_batch_size: int = 1


@dataclass(frozen=True)
class RunProgress:
    run_id: str
    step: int
    """Last step trained (0 before the first)."""
    max_steps: int | None


@dataclass
class Run:
    spec: RunSpec
    params: dict[str, torch.nn.Parameter]
    """The adapter's parameters by PEFT name (with the run id infix)."""
    optimizer: torch.optim.Optimizer
    trainer: TrainStep
    rng: torch.Tensor
    """CPU random state between the run's steps (dropout); see :meth:`RunTable._own_rng`."""
    step: int = 0


class _BaseLinears(torch.nn.Module):
    """The base's linear layers under their names before PEFT wrapped them, for ``check_targets``:
    a wrapped model's adapted layers are no longer ``nn.Linear`` and the adapters' own linears
    (``q_proj.lora_A.<run>``) would match targets named like a run."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def named_modules(self, *args: object, **kwargs: object) -> Iterator[tuple[str, torch.nn.Module]]:
        return iter(self.linears)


class RunTable:
    """The runs one trainer trains, each on its own adapter of one shared, frozen base."""

    def __init__(self, base: torch.nn.Module, max_concurrent_runs: int, settings: StepSettings) -> None:
        if is_lora(base):
            raise ValueError("RunTable takes the plain base model and adds each run's adapter itself")
        if max_concurrent_runs < 1:
            raise ValueError(f"max_concurrent_runs must be >= 1, got {max_concurrent_runs}")
        if settings.ctx.world_size > 1:
            raise ValueError(f"several runs with {settings.ctx.world_size} trainer ranks are not supported yet: "
                             "train LoRA runs on one rank")  # fmt: skip
        self.model = base
        """The base until the first join, then the PEFT model holding every run's adapter."""
        self.base_name = str(getattr(base, "name_or_path", "") or type(base).__name__)
        self.base_sha256 = base_fingerprint(base)
        """Computed once: no run writes the base (its optimizer holds only adapter parameters)."""
        self.max_concurrent_runs = max_concurrent_runs
        self.settings = settings
        self._linears = _BaseLinears(base)
        self._runs: dict[str, Run] = {}

    def runs(self) -> list[RunProgress]:
        return [RunProgress(run_id, run.step, run.spec.max_steps) for run_id, run in self._runs.items()]

    def run(self, run_id: str) -> Run:
        if run_id not in self._runs:
            raise KeyError(f"run {run_id!r} is not training here; active runs: {sorted(self._runs)}")
        return self._runs[run_id]

    def join(self, spec: RunSpec) -> Run:
        """Add ``spec``'s run with a fresh adapter at step 0 (``load`` resumes it from a checkpoint)."""
        self._check_joinable(spec)
        schedule = _schedule(spec)
        with _seeded(spec.seed):
            self._add_adapter(spec)
            rng = torch.get_rng_state()
        try:
            params = adapter_params(self.model, spec.run_id)
            self.model.set_adapter(spec.run_id)
            optimizer = build_optimizer(self.model, spec.optimizer)
            _check_optimizer_holds(optimizer, params, spec.run_id)
        except Exception:
            self.model.delete_adapter(spec.run_id)  # a run that did not join leaves nothing behind
            raise
        trainer = TrainStep(self.model, optimizer, schedule, self.settings.ctx, spec.optimizer.max_grad_norm,
                            spec.loss, self.settings.peak_flops, self.settings.padded_rows,
                            self.settings.micro_batch_size)  # fmt: skip
        run = self._runs[spec.run_id] = Run(spec, params, optimizer, trainer, rng)
        logger.info("run {} joined: LoRA rank {} on {}, {:,} adapter parameters; {} of {} runs active",
                    spec.run_id, spec.lora.rank, spec.lora.target_modules, sum(p.numel() for p in params.values()),
                    len(self._runs), self.max_concurrent_runs)  # fmt: skip
        return run

    def leave(self, run_id: str) -> RunProgress:
        """Remove the run and its adapter; its memory is freed with the last reference to the run."""
        run = self.run(run_id)
        with warnings.catch_warnings():
            # PEFT warns when the active adapter is deleted and it picks another one: expected here.
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self.model.delete_adapter(run_id)
        del self._runs[run_id]
        logger.info("run {} left at step {}; {} runs active", run_id, run.step, len(self._runs))
        return RunProgress(run_id, run.step, run.spec.max_steps)

    def train(self, run_id: str, step: int, rows: list[RowTensors], num_loss_tokens: int,
              sft: bool = False) -> dict[str, float]:  # fmt: skip
        """One optimizer step of ``run_id`` on its own ``rows``; returns the step's metrics."""
        run = self.run(run_id)
        if step != run.step + 1:
            raise ValueError(f"run {run_id!r} last trained step {run.step}; step {step} is not the next one")
        if run.spec.max_steps is not None and step > run.spec.max_steps:
            raise ValueError(f"run {run_id!r} ends at max_steps = {run.spec.max_steps}; got step {step}")
        self.model.set_adapter(run_id)
        try:
            with self._own_rng(run):
                metrics = run.trainer.run(step, rows, num_loss_tokens, sft)
        finally:
            # TrainStep clips over all of the model's gradients: none may outlive this run's step.
            run.optimizer.zero_grad(set_to_none=True)
        run.step = step
        return metrics

    def skip_to(self, run_id: str, step: int) -> None:
        """Count ``run_id`` as having used up steps up to ``step`` without training them: a batch
        rejected as bad, or an orchestrator that has acknowledged steps this run's state lacks."""
        run = self.run(run_id)
        if step < run.step:
            raise ValueError(f"run {run_id!r} is at step {run.step}; it cannot go back to step {step}")
        run.step = step

    def adapter_tensors(self, run_id: str) -> dict[str, torch.Tensor]:
        """A CPU copy of the run's adapter in the names of PEFT's and vLLM's adapter files
        (``...q_proj.lora_A.weight``: no run id infix)."""
        params = self.run(run_id).params
        return {file_name(name, run_id): p.detach().to("cpu", copy=True) for name, p in params.items()}

    def save(self, run_id: str, folder: Path, recheck_base: bool = False) -> None:
        """The run's adapter (a PEFT folder), optimizer, step and random state in ``folder``.
        ``recheck_base``: hash the live base again (one pass over its weights) and record that hash
        rather than the one taken at start, refusing to save if they differ."""
        base_sha256 = self.base_sha256
        if recheck_base and (base_sha256 := base_fingerprint(self.model)) != self.base_sha256:
            raise RuntimeError(f"the base's weights changed while training (sha256 {self.base_sha256[:12]}… at "
                               f"start, {base_sha256[:12]}… now): no run may write the base")  # fmt: skip
        save_run(self, self.run(run_id), folder, base_sha256)

    def load(self, run_id: str, folder: Path) -> RunProgress:
        """Resume the joined run ``run_id`` from its checkpoint in ``folder``."""
        run = self.run(run_id)
        load_run(self, run, folder)
        return RunProgress(run_id, run.step, run.spec.max_steps)

    def check_base(self, sha256: str, source: str) -> None:
        """Refuse an adapter (or a run) made for another base than the trainer's."""
        if sha256 != self.base_sha256:
            raise ValueError(f"{source} is for another base model (weights sha256 {sha256[:12]}…) than the "
                             f"trainer's ({self.base_name}, sha256 {self.base_sha256[:12]}…)")  # fmt: skip

    def _check_joinable(self, spec: RunSpec) -> None:
        if spec.run_id in self._runs:
            raise ValueError(f"run_id {spec.run_id!r} is already training here (at step "
                             f"{self._runs[spec.run_id].step}); a run id must be unique among active runs")  # fmt: skip
        if len(self._runs) >= self.max_concurrent_runs:
            raise ValueError(f"run {spec.run_id!r} cannot join: max_concurrent_runs = {self.max_concurrent_runs} "
                             f"runs are active ({sorted(self._runs)})")  # fmt: skip
        if spec.base_sha256 is not None:
            self.check_base(spec.base_sha256, f"run {spec.run_id!r}")
        try:
            check_targets(self._linears, spec.lora)
        except ValueError as exc:
            raise ValueError(f"run {spec.run_id!r}: {exc}") from exc

    def _add_adapter(self, spec: RunSpec) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        config = PeftLoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                                target_modules=list(spec.lora.target_modules), bias="none")  # fmt: skip
        if is_lora(self.model):
            self.model.add_adapter(spec.run_id, config)
        else:  # the first run wraps the base; later runs add to the same wrapper
            self.model = get_peft_model(self.model, config, adapter_name=spec.run_id)

    @contextmanager
    def _own_rng(self, run: Run) -> Iterator[None]:
        """The run's CPU random state for the duration of its step, so dropout draws do not depend
        on other runs' steps. CUDA random state is not kept per run yet (dropout > 0 on a GPU)."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(run.rng)
            yield
            run.rng = torch.get_rng_state()


def _schedule(spec: RunSpec) -> LRSchedule:
    try:
        return LRSchedule(spec.optimizer.lr, spec.scheduler, spec.max_steps)
    except ValueError as exc:
        raise ValueError(f"run {spec.run_id!r}: {exc}") from exc


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global CPU generator seeded for the block and restored after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_optimizer_holds(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                           run_id: str) -> None:  # fmt: skip
    """``build_optimizer`` takes what requires gradients; after ``set_adapter(run_id)`` that must be
    exactly the run's adapter (a PEFT that left other adapters or the base trainable would mix runs)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if held != {id(p) for p in params.values()}:
        raise RuntimeError(f"run {run_id!r}'s optimizer would hold {len(held)} tensors, its adapter has "
                           f"{len(params)}: PEFT left other parameters trainable")  # fmt: skip
