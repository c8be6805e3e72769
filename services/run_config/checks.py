"""Checks of a resolved config that a field's own validator cannot make: before anything starts.

Pydantic refuses a value that is wrong on its own (a negative port); these refuse values that
are wrong together or against the world: an environment that is not installed, a model folder
without a tokenizer, two services on one port, a resume step after the last step. Each check is
a pure function of the resolved config returning :class:`Problem` s; :func:`check_config`, called
by the CLI entry before ``--dry-run`` writes anything and before a run starts, turns them into
one :class:`ConfigError` (exit code 2), one line per problem. Nothing here imports torch or vLLM:
the model folder is read as JSON and file names. The one check that asks the network is the
teacher's (``opd`` and ``sft``; services/run_config/teacher.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlbus.config import ConfigError, ServiceConfig
from rlbus.environments import UnknownEnvironmentError, check_environment
from rlbus.model_path import looks_like_path, position_limit
from rlbus.run_files import METRICS_FILE, STEPS_FILE
from rlbus.services.inference.config import VLLM_LORA_RANKS, InferenceConfig, lora_rank_slot
from rlbus.services.monitor.config import dashboard_address
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.run_config.placement import placement_problems
from rlbus.services.run_config.rl import RlConfig
from rlbus.services.run_config.shared_trainer import shared_trainer_problems
from rlbus.services.run_config.teacher import teacher_problem
from rlbus.services.run_config.weight_group import group_listen_address, weight_group_problems
from rlbus.services.trainer.config import TrainerConfig, TrainingConfig
from rlbus.services.trainer.sft_config import SftConfig

# A tokenizer saved by transformers has one of these (fast, sentencepiece, or BPE files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "")
LOOPBACK_HOSTS = ("localhost", "::1")
BENCH_REFUSED = (STEPS_FILE, METRICS_FILE, "checkpoints")
"""What a run folder holds once a run trained in it (configs/ and logs/ alone: a --dry-run, a failed start)."""


@dataclass(frozen=True)
class Problem:
    """One thing in a config that would fail after start: where, what, and what to do."""

    key: str
    """Dotted key, as on the command line (``orchestrator.sampling.temperature``)."""
    value: Any
    """The value found there."""
    fix: str
    """Why it cannot work and what to set instead."""

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r}: {self.fix}"


def check_config(config: ServiceConfig) -> None:
    """Raise ConfigError naming every problem of ``config``; the one call site is the CLI entry."""
    problems = config_problems(config)
    if len(problems) == 1:
        raise ConfigError(str(problems[0]))
    if problems:
        raise ConfigError("\n".join([f"{len(problems)} problems before start:", *(f"  {p}" for p in problems)]))


def config_problems(config: ServiceConfig) -> list[Problem]:
    """Problems of the merged ``rl`` config or of one service's config run alone. Looked up by exact
    class: ``rlbus eval`` takes an orchestrator config but samples greedily on purpose."""
    if type(config) is RlConfig:
        return rl_problems(config)
    checks = SERVICE_CHECKS.get(type(config), ())
    return [problem for check in checks for problem in check(config, "")]


def rl_problems(config: RlConfig) -> list[Problem]:
    return [
        *model_problems(config.model, config.inference, "inference."),
        *orchestrator_problems(config.orchestrator, "orchestrator."),
        *context_problems(config.orchestrator, config.inference),
        *adapter_problems(config),
        *shared_trainer_problems(config),
        *lora_rank_problems(config.inference, "inference."),
        *resume_problems(config),
        *schedule_problems(config.trainer, "trainer."),
        *port_problems(config),
        *bench_folder_problems(config, ""),
        *placement_problems(config, os.environ),
        *weight_group_problems(config),
    ]


# ------------------------------------------------------------------ environments and sampling


def orchestrator_problems(config: OrchestratorConfig, prefix: str) -> list[Problem]:
    problems = environment_problems(config, prefix) + teacher_problems(config, prefix)
    if config.sampling.temperature <= 0:
        # The orchestrator refuses it at start too (core.Orchestrator): here it stops the command.
        problems.append(Problem(f"{prefix}sampling.temperature", config.sampling.temperature,
                                "training needs a temperature above 0 (the trainer divides its logits by it); "
                                "set e.g. 1.0 (greedy decoding is for `rlbus eval`)"))  # fmt: skip
    return problems


def environment_problems(config: OrchestratorConfig, prefix: str) -> list[Problem]:
    """Unknown ids, unknown arguments and arguments an environment's ``validate_args`` refuses."""
    specs = [(f"train.env[{i}]", env) for i, env in enumerate(config.train.env)]
    specs += [(f"eval.env[{i}]", env) for i, env in enumerate(config.eval.env)]
    problems = []
    for where, env in specs:
        try:
            check_environment(env.id, env.args)
        except UnknownEnvironmentError as exc:
            problems.append(Problem(f"{prefix}{where}.id", env.id, str(exc)))
        except (ValueError, TypeError) as exc:
            problems.append(Problem(f"{prefix}{where}.args", env.args, str(exc)))
    return problems


def teacher_problems(config: OrchestratorConfig, prefix: str) -> list[Problem]:
    """A teacher that does not answer, or (opd) returns no prompt logprobs or uses another tokenizer
    than the student's: asked over HTTP (services/run_config/teacher.py)."""
    if config.teacher is None:
        return []
    problem = teacher_problem(config.training_mode, config.teacher.client, config.model)
    return [] if problem is None else [Problem(f"{prefix}teacher.client.base_url", config.teacher.client.base_url,
                                               problem)]  # fmt: skip


def context_problems(orchestrator: OrchestratorConfig, inference: InferenceConfig) -> list[Problem]:
    """A completion of ``max_tokens`` must leave room for a prompt in ``max_model_len``."""
    max_tokens, max_model_len = orchestrator.sampling.max_tokens, inference.max_model_len
    if max_tokens < max_model_len:
        return []
    return [Problem("orchestrator.sampling.max_tokens", max_tokens,
                    f"a completion this long leaves no room for the prompt in inference.max_model_len = "
                    f"{max_model_len}; lower it below that or raise inference.max_model_len")]  # fmt: skip


# ------------------------------------------------------------------ the model folder


def model_problems(model: str, inference: InferenceConfig, prefix: str) -> list[Problem]:
    """The model must be a folder with config.json and a tokenizer (a hub id is not checked: that
    needs a network), and hold ``inference.max_model_len`` tokens."""
    path = Path(model).expanduser()
    if not path.exists():
        if not looks_like_path(model):  # a hub name (models/tiny too, while no ./models folder exists)
            return []
        return [Problem("model", model, "no such folder; make one with `rlbus model tiny --out DIR` "
                                        "or pass --model with a Hugging Face model folder")]  # fmt: skip
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or tokenizer_config.json)")
    if missing:
        return [Problem("model", model, f"not a model folder: it has no {' and no '.join(missing)}; "
                                        "pass --model with a folder written by save_pretrained")]  # fmt: skip
    return _length_problems(path, inference, prefix)


def _length_problems(path: Path, inference: InferenceConfig, prefix: str) -> list[Problem]:
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [Problem("model", str(path), f"config.json cannot be read ({exc}); pass a model folder")]
    limit = position_limit(hf_config)
    if limit is None or inference.max_model_len <= limit:
        return []
    return [Problem(f"{prefix}max_model_len", inference.max_model_len,
                    f"the model takes at most {limit} tokens (max_position_embeddings in its config.json); "
                    f"set {prefix}max_model_len to {limit} or less")]  # fmt: skip


def inference_problems(config: InferenceConfig, prefix: str) -> list[Problem]:
    return model_problems(config.model, config, prefix) + lora_rank_problems(config, prefix)


def lora_rank_problems(config: InferenceConfig, prefix: str) -> list[Problem]:
    """vLLM refuses any other ``--max-lora-rank`` as it starts, after the model loaded."""
    if not config.enable_lora or config.max_lora_rank in VLLM_LORA_RANKS:
        return []
    return [Problem(f"{prefix}max_lora_rank", config.max_lora_rank,
                    f"vLLM takes one of {list(VLLM_LORA_RANKS)}; set {lora_rank_slot(config.max_lora_rank)}")]  # fmt: skip


def adapter_problems(config: RlConfig) -> list[Problem]:
    """A LoRA run that sends only its adapter needs replicas that can serve it."""
    lora, inference = config.trainer.lora, config.inference
    if lora is None or lora.transfer != "adapter":
        return []
    if not inference.enable_lora:
        return [Problem("inference.enable_lora", False, "trainer.lora.transfer = 'adapter' sends only the adapter, "
                        "which replicas serve as a LoRA: set it true, or trainer.lora.transfer = 'merged'")]  # fmt: skip
    if lora.rank > inference.max_lora_rank:
        slot = lora_rank_slot(lora.rank)
        fix = f"raise that to {slot} or lower the rank" if slot >= lora.rank else f"vLLM serves ranks up to {slot}"
        return [Problem("trainer.lora.rank", lora.rank, f"above inference.max_lora_rank = {inference.max_lora_rank}, "
                        f"the largest rank the replicas load: {fix}")]  # fmt: skip
    if lora.name == inference.resolved_model_name():
        return [Problem("trainer.lora.name", lora.name, "is the served base model's name: requests naming it would "
                        "get the base; choose another name")]  # fmt: skip
    return []


# ------------------------------------------------------------------ checkpoints and resuming


def resume_problems(config: RlConfig) -> list[Problem]:
    """Resume steps after ``max_steps``, or with ``clean_output_dir`` (which deletes the checkpoints)."""
    problems: dict[str, Problem] = {}
    for name in ("trainer", "orchestrator"):
        ckpt = getattr(config, name).ckpt
        # Name the key the user set: the section's own, else the run's ckpt.resume_step it came from.
        key = f"{name}.ckpt.resume_step" if "resume_step" in ckpt.model_fields_set else "ckpt.resume_step"
        for problem in _resume_step_problems(key, ckpt.resume_step, config.max_steps):
            problems.setdefault(key, problem)
        if config.clean_output_dir and ckpt.resume_step not in (None, -1):
            problems.setdefault(key, Problem(key, ckpt.resume_step,
                                             "--clean-output-dir deletes the checkpoints it would resume from; "
                                             "drop one of the two (-1 resumes from the latest, if any)"))  # fmt: skip
    return list(problems.values())


def section_resume_problems(config: OrchestratorConfig | TrainerConfig, prefix: str) -> list[Problem]:
    return _resume_step_problems(f"{prefix}ckpt.resume_step", config.ckpt.resume_step, config.max_steps)


def _resume_step_problems(key: str, resume_step: int | None, max_steps: int | None) -> list[Problem]:
    if resume_step is None or max_steps is None or resume_step <= max_steps:
        return []
    return [Problem(key, resume_step, f"it is after max_steps = {max_steps}, so nothing is left to train; "
                                      "resume from an earlier step or raise --max-steps")]  # fmt: skip


def schedule_problems(config: TrainingConfig, prefix: str) -> list[Problem]:
    """A learning-rate warmup longer than the run (the trainer's LRSchedule refuses it at start)."""
    warmup, max_steps = config.scheduler.warmup_steps, config.max_steps
    if max_steps is None or warmup <= max_steps:
        return []
    return [Problem(f"{prefix}scheduler.warmup_steps", warmup, f"it is longer than max_steps = {max_steps}; "
                                                               "lower it (0: no warmup) or raise --max-steps")]  # fmt: skip


def bench_folder_problems(config: RlConfig | SftConfig, prefix: str) -> list[Problem]:
    """``--bench`` in a folder that holds a run: the monitor and SFT append to its files, so the bench's
    rows would land among that run's and (``rlbus rl``) the table would read both."""
    output_dir = config.output_dir
    if not config.bench or getattr(config, "clean_output_dir", False) or not output_dir.is_dir():
        return []
    found = [name for name in BENCH_REFUSED if (output_dir / name).exists()]
    if not found:
        return []
    clean = " or add --clean-output-dir to delete it" if isinstance(config, RlConfig) else ""
    return [Problem(f"{prefix}output_dir", str(output_dir),
                    f"--bench needs a run folder of its own, and this one holds a run ({', '.join(found)}): "
                    f"pick another --output-dir{clean}")]  # fmt: skip


# ------------------------------------------------------------------ ports


def port_problems(config: RlConfig) -> list[Problem]:
    """Two listening sockets on one address: the second service would fail to bind after the first started."""
    problems = []
    taken: list[tuple[str, str, str]] = []  # (key, host, port or ipc path) of sockets listed before
    for key, value, host, port in _listening_addresses(config):
        clash = next((other for other in taken if other[2] == port and _same_host(other[1], host)), None)
        if clash is not None:
            where = "that ipc path" if host == "ipc" else f"port {port} on {host or '*'}"
            problems.append(Problem(key, value, f"{clash[0]} listens on {where} too; give each socket its own"))
        taken.append((key, host, port))
    return problems


def _listening_addresses(config: RlConfig) -> Iterator[tuple[str, Any, str, str]]:
    """(key, value, host, port or ipc path) of every listening socket; the HTTP ports come last, so
    a clash is reported on them, the keys users change more often than the bus's."""
    for name, endpoint in config.bus.endpoints.model_dump().items():
        scheme, _, rest = endpoint.partition("://")
        if scheme == "tcp":
            host, _, port = rest.rpartition(":")
            yield f"bus.endpoints.{name}", endpoint, host.strip("[]"), port
        elif scheme == "ipc":
            yield f"bus.endpoints.{name}", endpoint, "ipc", rest
    group = group_listen_address(config)
    if group is not None:
        yield "trainer.weight_group_address", config.trainer.weight_group_address, group[0], str(group[1])
    yield "inference.port", config.inference.port, config.inference.host, str(config.inference.port)
    address = dashboard_address(config.monitor.dashboard)
    if address is not None and address[1] != 0:  # None: no dashboard; port 0 picks a free one
        yield "monitor.dashboard", config.monitor.dashboard, address[0], str(address[1])


def _same_host(a: str, b: str) -> bool:
    if "ipc" in (a, b):
        return a == b
    if a in WILDCARD_HOSTS or b in WILDCARD_HOSTS:
        return True
    return _host_key(a) == _host_key(b)


def _host_key(host: str) -> str:
    return "loopback" if host in LOOPBACK_HOSTS or host.startswith("127.") else host


SERVICE_CHECKS: dict[type[ServiceConfig], tuple[Callable[[Any, str], list[Problem]], ...]] = {
    OrchestratorConfig: (orchestrator_problems, section_resume_problems),
    TrainerConfig: (section_resume_problems, schedule_problems),
    InferenceConfig: (inference_problems,),
    SftConfig: (schedule_problems, bench_folder_problems),
}
"""Checks of a service's config when it runs alone (``rlbus orchestrator @ orchestrator.toml``)."""
