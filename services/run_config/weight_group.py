"""How ``rlbus rl`` wires the collective weight transport (``trainer.weight_transport = "collective"``).

The trainer's section says everything: the launcher gives each replica it starts the trainer's
address, replica count, backend and timeout, and its own rank (replica i is rank i + 1) as flags,
as it gives them their relay flags (services/run_config/placement.py). Unless set, the trainer's
``weight_group_address`` becomes ``127.0.0.1:29650`` (:data:`LOCAL_PORT`; every process of a local
run is on this host) and ``weight_group_replicas`` the number of replicas started. What cannot work
is refused before anything starts (:func:`weight_group_problems`), each with the key to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlbus.services.run_config.placement import num_inference_replicas
from rlbus.weights_collective import parse_address

if TYPE_CHECKING:
    from rlbus.services.run_config.checks import Problem
    from rlbus.services.run_config.rl import RlConfig

LOCAL_PORT = 29650
"""Port of the trainer's rendezvous store in a local run whose ``trainer.weight_group_address`` is unset."""
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
REPLICA_KEYS = ("weight_group_address", "weight_group_rank", "weight_group_replicas", "weight_group_backend",
                "weight_group_timeout_s")  # fmt: skip
"""The replica's weight group fields that ``rlbus rl`` sets itself (``weight_group_verify`` stays the user's)."""


def with_local_address(values: Any) -> Any:
    """``values`` of an rl config, with the trainer's ``weight_group_address`` set to loopback when the
    trainer is collective and names none. Runs before the sections validate: the trainer's own
    config refuses the collective transport without an address, which a trainer started alone needs."""
    trainer = values.get("trainer") if isinstance(values, dict) else None
    if not isinstance(trainer, dict) or trainer.get("weight_transport") != "collective":
        return values
    if trainer.get("weight_group_address") is not None:
        return values
    return {**values, "trainer": {**trainer, "weight_group_address": f"127.0.0.1:{LOCAL_PORT}"}}


def size_the_group(config: RlConfig) -> None:
    """The trainer waits for every replica the launcher starts (unless ``weight_group_replicas`` is set:
    :func:`weight_group_problems` then checks that it agrees)."""
    trainer = config.trainer
    if trainer.weight_transport == "collective" and "weight_group_replicas" not in trainer.model_fields_set:
        trainer.__dict__["weight_group_replicas"] = num_inference_replicas(config)


def weight_group_args(config: RlConfig, index: int) -> tuple[str, ...]:
    """Flags making replica ``index`` rank ``index + 1`` of the trainer's weight group: its address (a
    wildcard host as loopback), replica count, backend and timeout. Nothing on the bus (the default)."""
    trainer = config.trainer
    if trainer.weight_transport != "collective" or trainer.weight_group_address is None:
        return ()
    host, port = parse_address(trainer.weight_group_address)
    host = "127.0.0.1" if host in WILDCARD_HOSTS else f"[{host}]" if ":" in host else host
    return ("--weight-transport", "collective", "--weight-group-address", f"{host}:{port}",
            "--weight-group-replicas", str(trainer.weight_group_replicas), "--weight-group-rank", str(index + 1),
            "--weight-group-backend", trainer.weight_group_backend,
            "--weight-group-timeout-s", repr(trainer.weight_group_timeout_s))  # fmt: skip


def group_listen_address(config: RlConfig) -> tuple[str, int] | None:
    """(host, port) the trainer's rendezvous store binds in this run; None on the bus."""
    trainer = config.trainer
    if trainer.weight_transport != "collective" or trainer.weight_group_address is None:
        return None
    return parse_address(trainer.weight_group_address)


def weight_group_problems(config: RlConfig) -> list[Problem]:
    """Replica settings ``rlbus rl`` would override, and the collective transport where it cannot work:
    a shared trainer or LoRA adapters (nothing to broadcast), ``--slurm`` (other nodes), tensor
    parallelism, the fan-out tree, a replica count or a port that disagrees with the run."""
    problems = _replica_key_problems(config)
    if config.trainer.weight_transport != "collective":
        return problems
    return problems + _refused_combinations(config) + _size_and_port_problems(config)


def _replica_key_problems(config: RlConfig) -> list[Problem]:
    from rlbus.services.run_config.checks import Problem

    inference, problems = config.inference, []
    if inference.weight_transport == "collective":
        problems.append(Problem("inference.weight_transport", "collective", "rlbus rl sets each replica's "
                                "transport from trainer.weight_transport; set that one instead"))  # fmt: skip
    for key in REPLICA_KEYS:
        if key in inference.model_fields_set:
            problems.append(Problem(f"inference.{key}", getattr(inference, key), "rlbus rl gives each replica "
                                    "the trainer's weight group settings (trainer.weight_group_*) and its own "
                                    "rank; remove it"))  # fmt: skip
    return problems


def _refused_combinations(config: RlConfig) -> list[Problem]:
    from rlbus.services.run_config.checks import Problem

    key, problems = "trainer.weight_transport", []
    if config.shared_trainer is not None:
        problems.append(Problem(key, "collective", "a [shared_trainer] trains this run and publishes adapters, "
                                "which travel over the bus; leave it unset"))  # fmt: skip
    elif config.trainer.lora is not None and config.trainer.lora.transfer == "adapter":
        problems.append(Problem("trainer.lora.transfer", "adapter", "with trainer.weight_transport = "
                                "\"collective\" only full weights are broadcast and an adapter always travels "
                                "over the bus: the group would carry nothing; set it to \"merged\" or leave "
                                "weight_transport unset"))  # fmt: skip
    if config.slurm.enabled:
        problems.append(Problem(key, "collective", "rlbus rl --slurm does not wire the weight group (replicas "
                                "on other nodes need the trainer node's address): leave it unset, or start the "
                                "services yourself with trainer and inference weight_group_* set "
                                "(docs/inference.md)"))  # fmt: skip
    inference = config.inference
    if inference.tensor_parallel_size != 1:
        problems.append(Problem("inference.tensor_parallel_size", inference.tensor_parallel_size,
                                "trainer.weight_transport = \"collective\" needs one rank per replica in the "
                                "weight group: set it to 1, or leave weight_transport unset"))  # fmt: skip
    if inference.weights_fanout:
        problems.append(Problem("inference.weights_fanout", inference.weights_fanout, "the fan-out tree and "
                                "the collective transport do not combine (a replica that took a step by broadcast "
                                "has nothing to relay: a peer would wait weights_relay_wait_s on it before asking "
                                "the trainer); set it to 0, or leave trainer.weight_transport unset"))  # fmt: skip
    return problems


def _size_and_port_problems(config: RlConfig) -> list[Problem]:
    from rlbus.services.run_config.checks import Problem

    trainer, count, problems = config.trainer, num_inference_replicas(config), []
    if trainer.weight_group_replicas != count:
        problems.append(Problem("trainer.weight_group_replicas", trainer.weight_group_replicas, f"rlbus rl "
                                f"starts {count} replica(s) and each joins the group, which forms only once all "
                                "did; leave it unset"))  # fmt: skip
    _, port = parse_address(trainer.weight_group_address)  # type: ignore[arg-type]
    # inference.port itself is compared with every listening socket in checks.port_problems.
    https = range(config.inference.port + 1, config.inference.port + count)
    if port in https:
        problems.append(Problem("trainer.weight_group_address", trainer.weight_group_address, f"port {port} is "
                                f"the HTTP port of replica {port - config.inference.port}; pick another"))  # fmt: skip
    return problems
