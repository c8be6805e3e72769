"""GPU placement of a local ``rlbus rl`` run: which GPUs each inference replica and the trainer see.

``inference_gpu_ids`` and ``trainer_gpu_ids`` (top level of the rl config, as in prime-rl) name GPUs
by their index on this machine. Inference ids form one replica per group: a flat list is cut into
groups of ``inference.tensor_parallel_size``, a list of lists gives the groups themselves (each
group's size becomes the tensor parallel size). The launcher starts one ``rlbus inference`` per
group on its own port (``inference.port + i``) with ``CUDA_VISIBLE_DEVICES`` set to the group, the
trainer as one rank per trainer GPU with ``CUDA_VISIBLE_DEVICES`` set to all of them, and points
the env-workers at every replica. Nothing here imports torch: the GPUs are counted from
``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L`` (docs/scaling.md).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlbus.services.run_config.checks import Problem
    from rlbus.services.run_config.rl import RlConfig

FAKE_GPU_COUNT_VARIABLE = "RLBUS_FAKE_GPU_COUNT"
"""For tests only: pretend this machine has that many GPUs (ids 0..N-1), so the placement the
launcher builds can be checked on a machine without any. Never set it for a real run."""
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def inference_groups(config: RlConfig) -> list[list[int]]:
    """The GPU ids of each inference replica; empty when ``inference_gpu_ids`` is not set."""
    ids = config.inference_gpu_ids
    if not ids:
        return []
    if isinstance(ids[0], list):
        return [list(group) for group in ids]  # type: ignore[arg-type]
    size = config.inference.tensor_parallel_size
    return [list(ids[start : start + size]) for start in range(0, len(ids), size)]  # type: ignore[misc]


def num_inference_replicas(config: RlConfig) -> int:
    """Replicas the local launcher starts: one per GPU group, one without GPU ids."""
    return max(1, len(inference_groups(config)))


def visible_gpus(environ: Mapping[str, str]) -> tuple[list[str], str]:
    """The GPUs processes started from here can use, as ``CUDA_VISIBLE_DEVICES`` entries (index
    i of the config is entry i), and where that was seen, for messages."""
    fake = environ.get(FAKE_GPU_COUNT_VARIABLE)
    if fake is not None:
        return [str(i) for i in range(int(fake))], f"{FAKE_GPU_COUNT_VARIABLE}={fake}"
    if VISIBLE_DEVICES in environ:
        entries = [entry.strip() for entry in environ[VISIBLE_DEVICES].split(",") if entry.strip()]
        return entries, f"{VISIBLE_DEVICES}={environ[VISIBLE_DEVICES]!r}"
    if shutil.which("nvidia-smi") is None:
        return [], "no nvidia-smi on PATH and no CUDA_VISIBLE_DEVICES"
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi -L failed ({exc})"
    count = sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(count)], f"nvidia-smi -L lists {count}"


def placement_environments(config: RlConfig, environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Extra environment per process name of the local process table: ``CUDA_VISIBLE_DEVICES`` of
    each inference replica and of the trainer (every rank sees all trainer GPUs and takes the one
    of its ``LOCAL_RANK``). Empty without GPU ids: every process inherits the launcher's."""
    visible, _ = visible_gpus(environ) if _has_ids(config) else ([], "")
    envs: dict[str, dict[str, str]] = {}
    groups = inference_groups(config)
    for index, group in enumerate(groups):
        envs[inference_process_name(index, len(groups))] = {VISIBLE_DEVICES: _devices(group, visible)}
    if config.trainer_gpu_ids:
        envs["trainer"] = {VISIBLE_DEVICES: _devices(config.trainer_gpu_ids, visible)}
    return envs


def trainer_world_size(config: RlConfig) -> int:
    """Trainer ranks in all: ``trainer.num_ranks`` on each node (several only under ``--slurm``)."""
    return config.trainer.num_ranks * (config.slurm.trainer_nodes if config.slurm.enabled else 1)


def inference_process_name(index: int, num_replicas: int) -> str:
    """``inference`` alone, ``inference-0``, ``inference-1``, ... for several (as under SLURM)."""
    return "inference" if num_replicas == 1 else f"inference-{index}"


def weight_relay_args(config: RlConfig, index: int, num_replicas: int) -> tuple[str, ...]:
    """Flags placing replica ``index`` in the weight fan-out tree of ``inference.weights_fanout`` k:
    replica i pulls from replica (i - 1) // k (replica 0 from the trainer) and serves its peers at
    ``tcp://127.0.0.1:<weights_relay_port + i>`` when it has any. Nothing with one replica or k = 0."""
    fanout, port = config.inference.weights_fanout, config.inference.weights_relay_port
    if fanout == 0 or num_replicas < 2:
        return ()
    args: tuple[str, ...] = ()
    if index * fanout + 1 < num_replicas:  # it has a child: (child - 1) // k == index
        args += ("--weights-relay", f"tcp://127.0.0.1:{port + index}")
    if index > 0:
        args += ("--weights-upstream", f'["tcp://127.0.0.1:{port + (index - 1) // fanout}"]')
    return args


def placement_problems(config: RlConfig, environ: Mapping[str, str]) -> list[Problem]:
    """Group sizes that do not divide, ids listed twice or that do not exist, GPUs shared without a
    memory split, and rank counts that disagree with the GPU list."""
    problems = _shape_problems(config) + _relay_problems(config)
    if _has_ids(config):
        problems += _existence_problems(config, environ) + _sharing_problems(config)
    return problems + _rank_problems(config)


def _shape_problems(config: RlConfig) -> list[Problem]:
    from rlbus.services.run_config.checks import Problem

    problems = []
    ids, tp = config.inference_gpu_ids, config.inference.tensor_parallel_size
    for key, value in (("inference_gpu_ids", ids), ("trainer_gpu_ids", config.trainer_gpu_ids)):
        if value is not None and not value:
            problems.append(Problem(key, value, "an empty list places nothing; leave it unset (CPU) or name GPUs"))
    if ids and not isinstance(ids[0], list) and len(ids) % tp:
        problems.append(Problem("inference_gpu_ids", ids, f"{len(ids)} GPUs do not divide into replicas of "
                                f"inference.tensor_parallel_size = {tp}; list a multiple of {tp}"))  # fmt: skip
    if ids and isinstance(ids[0], list):
        sizes = sorted({len(group) for group in ids})  # type: ignore[arg-type]
        if len(sizes) > 1 or 0 in sizes:
            problems.append(Problem("inference_gpu_ids", ids, f"replica groups of sizes {sizes}: every replica "
                                    "needs the same number of GPUs (its tensor parallel size), at least one"))  # fmt: skip
        elif sizes[0] != tp:
            problems.append(Problem("inference.tensor_parallel_size", tp, f"the groups of inference_gpu_ids "
                                    f"have {sizes[0]} GPUs each; set it to {sizes[0]} or leave it unset"))  # fmt: skip
    inference = [gpu for group in inference_groups(config) for gpu in group]
    for key, listed in (("inference_gpu_ids", inference), ("trainer_gpu_ids", config.trainer_gpu_ids or [])):
        twice = sorted(gpu for gpu, count in Counter(listed).items() if count > 1)
        if twice:
            problems.append(Problem(key, _value(config, key), f"GPU(s) {twice} listed more than once; "
                                    "two replicas (or ranks) on one GPU would each take its memory"))  # fmt: skip
    return problems


def _relay_problems(config: RlConfig) -> list[Problem]:
    from rlbus.services.run_config.checks import Problem

    inference, count = config.inference, num_inference_replicas(config)
    if inference.weights_fanout == 0 or count < 2:
        return []
    relays = range(inference.weights_relay_port, inference.weights_relay_port + count)
    https = range(inference.port, inference.port + count)
    if relays[-1] > 65535 or set(relays) & set(https):
        return [Problem("inference.weights_relay_port", inference.weights_relay_port,
                        f"the {count} replicas' relays need ports {relays[0]}..{relays[-1]}, which must be at most "
                        f"65535 and apart from their HTTP ports {https[0]}..{https[-1]}")]  # fmt: skip
    return []


def _existence_problems(config: RlConfig, environ: Mapping[str, str]) -> list[Problem]:
    from rlbus.services.run_config.checks import Problem

    visible, seen = visible_gpus(environ)
    problems = []
    for key in ("inference_gpu_ids", "trainer_gpu_ids"):
        ids = _flat(_value(config, key))
        missing = sorted({gpu for gpu in ids if not 0 <= gpu < len(visible)})
        if not missing:
            continue
        if not visible:
            fix = (f"no GPU is visible on this machine ({seen}); leave inference_gpu_ids and trainer_gpu_ids "
                   "unset to run on the CPU")  # fmt: skip
        else:
            fix = (
                f"GPU(s) {missing} do not exist: this machine shows {len(visible)} ({seen}), ids 0..{len(visible) - 1}"
            )
        problems.append(Problem(key, _value(config, key), fix))
    return problems


def _sharing_problems(config: RlConfig) -> list[Problem]:
    from rlbus.services.run_config.checks import Problem

    shared = sorted(set(_flat(config.inference_gpu_ids)) & set(config.trainer_gpu_ids or []))
    inference_share, trainer_share = config.inference.gpu_memory_utilization, config.trainer_gpu_memory_fraction
    if not shared or inference_share + trainer_share <= 1:
        return []
    return [Problem("inference.gpu_memory_utilization", inference_share,
                    f"GPU(s) {shared} are shared by inference and the trainer, and {inference_share:g} plus "
                    f"trainer_gpu_memory_fraction = {trainer_share:g} is more than the whole GPU; lower one so "
                    "they sum to 1 or less (e.g. 0.5 and 0.5), or give the trainer GPUs of its own")]  # fmt: skip


def _rank_problems(config: RlConfig) -> list[Problem]:
    from rlbus.services.run_config.checks import Problem

    problems = []
    ids, ranks = config.trainer_gpu_ids, config.trainer.num_ranks
    if ids and ranks != len(ids):
        problems.append(Problem("trainer.num_ranks", ranks, f"trainer_gpu_ids names {len(ids)} GPU(s) and the "
                                "trainer runs one rank per GPU; leave trainer.num_ranks unset or make them agree"))  # fmt: skip
    world_size, expected = config.orchestrator.trainer_world_size, trainer_world_size(config)
    if world_size != expected:
        problems.append(Problem("orchestrator.trainer_world_size", world_size, f"the trainer runs {expected} "
                                "rank(s) (trainer.num_ranks, times slurm.trainer_nodes under --slurm) and the "
                                "orchestrator must pack each batch for that many; leave it unset"))  # fmt: skip
    if config.trainer.compile and expected > 1:
        problems.append(Problem("trainer.compile", True, f"the trainer runs {expected} rank(s) and compiles on one "
                                "only, for now; set --no-trainer.compile"))  # fmt: skip
    if _has_ids(config) and config.slurm.enabled:
        key = "inference_gpu_ids" if config.inference_gpu_ids else "trainer_gpu_ids"
        problems.append(Problem(key, _value(config, key), "GPU ids place local processes; under --slurm each "
                                "task gets its GPUs from slurm.<service>.gpus (docs/scaling.md)"))  # fmt: skip
    return problems


def _has_ids(config: RlConfig) -> bool:
    return bool(config.inference_gpu_ids) or bool(config.trainer_gpu_ids)


def _value(config: RlConfig, key: str) -> list:
    return getattr(config, key) or []


def _flat(ids: Sequence[int] | Sequence[Sequence[int]] | None) -> list[int]:
    return [gpu for item in ids or [] for gpu in (item if isinstance(item, list) else [item])]


def _devices(ids: Sequence[int], visible: Sequence[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for ``ids``: index i is the i-th GPU this machine shows (the i-th
    entry of the launcher's own ``CUDA_VISIBLE_DEVICES`` when it has one)."""
    return ",".join(visible[gpu] if 0 <= gpu < len(visible) else str(gpu) for gpu in ids)
