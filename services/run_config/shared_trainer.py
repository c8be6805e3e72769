"""``[shared_trainer]`` of the rl config: this run trains on a trainer it does not start.

A shared trainer (``rlbus trainer`` with ``max_concurrent_runs``, started by itself) trains several
runs, each on its own LoRA adapter with its own optimizer, schedule and progress (docs/lora.md,
"Several runs, one trainer"). A run with ``[shared_trainer]`` starts its own inference replica,
orchestrator, env-workers and monitor but no trainer: its orchestrator joins the shared trainer
with the run's ``RunSpec`` (built here from ``[trainer.lora]``, ``[trainer.optimizer]``,
``[trainer.scheduler]``, ``[trainer.loss]``, ``max_steps`` and ``seed``), and its replica fetches
the run's adapter from the shared trainer's weight channel. The run id names the adapter
everywhere: the replica waits for it, env-workers request it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from rlbus.config import ConfigModel
from rlbus.config.base import BusEndpoints
from rlbus.identity import run_id_problem
from rlbus.services.orchestrator.config import SharedTrainerJoinConfig

if TYPE_CHECKING:
    from rlbus.services.run_config.checks import Problem
    from rlbus.services.run_config.rl import RlConfig

DEFAULT_ENDPOINTS = BusEndpoints()
ENDPOINT_KEYS = {"address": "trainer_runs", "weights": "trainer_weights", "announce": "trainer_announce"}
"""Field of ``[shared_trainer]`` -> the run's ``bus.endpoints`` key it sets."""


class SharedTrainerConfig(ConfigModel):
    """Train on a shared trainer (``rlbus trainer`` with ``max_concurrent_runs``) instead of starting
    a trainer: give its endpoints; the run needs ``[trainer.lora]`` (docs/lora.md)."""

    address: str = Field(DEFAULT_ENDPOINTS.trainer_runs, min_length=1)
    """The shared trainer's ``bus.endpoints.trainer_runs``, where the run's orchestrator joins."""
    weights: str = Field(DEFAULT_ENDPOINTS.trainer_weights, min_length=1)
    """The shared trainer's ``bus.endpoints.trainer_weights`` (adapters are fetched there)."""
    announce: str = Field(DEFAULT_ENDPOINTS.trainer_announce, min_length=1)
    """The shared trainer's ``bus.endpoints.trainer_announce`` (new steps are announced there)."""
    run_id: str | None = None
    """The run's name on the trainer, of its adapter and its checkpoint folder (letters, digits,
    ``_``, ``-``); None takes ``trainer.lora.name`` when the config sets it."""


def resolved_run_id(config: RlConfig) -> str | None:
    """``shared_trainer.run_id``, else ``trainer.lora.name`` when set; None when neither is."""
    shared, lora = config.shared_trainer, config.trainer.lora
    if shared is not None and shared.run_id is not None:
        return shared.run_id
    if lora is not None and "name" in lora.model_fields_set:
        return lora.name
    return None


def join_shared_trainer(config: RlConfig) -> None:
    """Point the run at the shared trainer: the bus's trainer endpoints, the adapter's name and the
    orchestrator's join (with the RunSpec). What cannot work is left for :func:`shared_trainer_problems`."""
    shared = config.shared_trainer
    if shared is None:
        return
    _point_the_bus(config, shared)
    run_id, lora = resolved_run_id(config), config.trainer.lora
    if lora is not None and shared.run_id is not None and "name" in lora.model_fields_set and lora.name != run_id:
        raise ValueError(f"shared_trainer.run_id = {run_id!r} but trainer.lora.name = {lora.name!r}: the run id is "
                         "its adapter's name; set only one of them")  # fmt: skip
    if lora is None or run_id is None:
        return
    lora.__dict__["name"] = run_id  # the replica awaits it and env-workers request it (_serve_the_adapter)
    join = SharedTrainerJoinConfig(runs_address=shared.address, run_id=run_id, spec=run_spec(config, run_id))
    orchestrator = config.orchestrator
    if "shared_trainer" in orchestrator.model_fields_set and orchestrator.shared_trainer not in (None, join):
        raise ValueError("orchestrator.shared_trainer is set and differs from what [shared_trainer] and "
                         "[trainer.*] make of it: set [shared_trainer] only")  # fmt: skip
    orchestrator.__dict__["shared_trainer"] = join


def run_spec(config: RlConfig, run_id: str) -> dict[str, Any]:
    """The run's ``RunSpec`` (services/trainer/multi_run.py) as JSON, from its trainer sections."""
    trainer = config.trainer
    sections = {name: getattr(trainer, name) for name in ("lora", "optimizer", "scheduler", "loss")}
    spec = {"run_id": run_id, **{name: section.model_dump(mode="json") for name, section in sections.items()},
            "max_steps": config.max_steps, "seed": config.seed}  # fmt: skip
    return _without_none(spec)


def _without_none(value: Any) -> Any:
    """``value`` without None entries (TOML has no null; RunSpec's defaults for them are None)."""
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    return value


def _point_the_bus(config: RlConfig, shared: SharedTrainerConfig) -> None:
    """The run's bus (one object shared by every section) uses the shared trainer's endpoints."""
    endpoints = config.bus.endpoints
    for field, key in ENDPOINT_KEYS.items():
        wanted, current = getattr(shared, field), getattr(endpoints, key)
        if key in endpoints.model_fields_set and current != wanted:
            raise ValueError(f"bus.endpoints.{key} = {current!r} but shared_trainer.{field} = {wanted!r}: the "
                             f"run reaches the shared trainer there; set only shared_trainer.{field}")  # fmt: skip
        endpoints.__dict__[key] = wanted


def shared_trainer_problems(config: RlConfig) -> list[Problem]:
    """What a shared-trainer run cannot do, before anything starts."""
    from rlbus.services.run_config.checks import Problem

    shared, lora = config.shared_trainer, config.trainer.lora
    if shared is None:
        if config.orchestrator.shared_trainer is not None:
            return [Problem("orchestrator.shared_trainer", config.orchestrator.shared_trainer.run_id,
                            "the launcher would start a trainer of the run's own as well; set [shared_trainer] "
                            "(with the trainer's endpoints) instead")]  # fmt: skip
        return []
    problems = []
    if lora is None:
        problems.append(Problem("trainer.lora", None, "a shared trainer trains each run as its own LoRA adapter: "
                                "add a [trainer.lora] section (rank, alpha, target_modules)"))  # fmt: skip
    elif lora.transfer != "adapter":
        problems.append(Problem("trainer.lora.transfer", lora.transfer, "a shared trainer sends each run only its "
                                "adapter; set it to 'adapter' (the replica serves it under the run id)"))  # fmt: skip
    run_id = resolved_run_id(config)
    if run_id is None:
        problems.append(Problem("shared_trainer.run_id", None, "name the run on the shared trainer (its adapter "
                                "and checkpoint folder), e.g. run_id = \"reverse-a\"; two runs need two names"))  # fmt: skip
    elif (problem := run_id_problem(run_id)) is not None:
        key = "shared_trainer.run_id" if shared.run_id is not None else "trainer.lora.name"
        problems.append(Problem(key, run_id, f"cannot name a run on a shared trainer: {problem}"))
    return problems + _placement_problems(config)


def _placement_problems(config: RlConfig) -> list[Problem]:
    from rlbus.services.run_config.checks import Problem

    problems = []
    if config.slurm.enabled:
        problems.append(Problem("slurm.enabled", True, "a shared-trainer run is started locally for now; drop "
                                "--slurm or [shared_trainer]"))  # fmt: skip
    if config.trainer_gpu_ids:
        problems.append(Problem("trainer_gpu_ids", config.trainer_gpu_ids, "this run starts no trainer: the shared "
                                "trainer's own command places it; leave it unset"))  # fmt: skip
    if config.trainer.num_ranks != 1:
        problems.append(Problem("trainer.num_ranks", config.trainer.num_ranks, "a shared trainer runs one rank, "
                                "and the run's batches are packed for it; leave it at 1"))  # fmt: skip
    return problems
