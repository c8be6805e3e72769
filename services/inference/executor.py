"""Where vLLM runs its model worker (``inference.worker_in_engine_process``).

vLLM's OpenAI server always runs its engine core in a process of its own. With one worker, vLLM's
GPU platforms run that worker inside the engine-core process (the uniproc executor), but its CPU
platform (vLLM 0.32, ``CpuPlatform.check_and_update_config``) switches to the multiprocessing
executor, a third process, unless ``VLLM_ENABLE_V1_MULTIPROCESSING`` is ``0``: its reason is
thread pinning for the offline ``LLM`` class, whose engine would otherwise run in the user's own
process. In the server the engine core is a fresh process of vLLM's, so the worker pins its
threads there as it would in its own. The variable only decides the executor for the server:
``AsyncLLM`` starts its engine-core process whatever it says.

The third process costs a start (torch and vLLM imported again, ~6 s on 2 cores) and, every
engine step, a shared-memory queue hop each way between engine core and worker, which a model as
small as the quickstart's feels: measured offline on 2 cores, 64 rollouts of <= 64 tokens took
1.04 s with the worker in its own process and 0.72 s in the engine's.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

VARIABLE = "VLLM_ENABLE_V1_MULTIPROCESSING"


def place_worker(in_engine_process: bool, tensor_parallel_size: int,
                 environ: MutableMapping[str, str] = os.environ) -> bool:  # fmt: skip
    """Ask vLLM for the uniproc executor when ``in_engine_process`` and one worker; True if asked.

    A value the user set in the environment wins (they asked vLLM for something explicitly)."""
    if not in_engine_process or tensor_parallel_size != 1 or VARIABLE in environ:
        return False
    environ[VARIABLE] = "0"
    return True


THREADS_BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def bind_cpu_threads(cores: str | None, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Hand ``inference.cpu_threads_bind`` to vLLM's CPU worker (it reads it in the engine's process,
    which inherits this environment); True if set. ``OMP_NUM_THREADS`` becomes the number of cores
    given as well: vLLM pins torch's threads, but torch.compile'd kernels size their OpenMP teams
    from it, and a team larger than the cores left to it spins against the trainer (measured on 2
    cores at ``max_async_level = 1``: 61.6 s for 30 steps without it, 41.9 s with it)."""
    if cores is None:
        return False
    environ[THREADS_BIND_VARIABLE] = cores
    if (count := count_cores(cores)) is not None:
        environ["OMP_NUM_THREADS"] = str(count)
    return True


def count_cores(cores: str) -> int | None:
    """Cores in the first worker's list of a ``VLLM_CPU_OMP_THREADS_BIND`` value ("0-3,6" is 5);
    None for ``auto`` and ``nobind``."""
    if cores in ("auto", "nobind"):
        return None
    count = 0
    for part in cores.split("|")[0].split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return max(count, 1)


AOT_VARIABLE = "VLLM_USE_AOT_COMPILE"


def skip_broken_aot_cache(on_cpu: bool, environ: MutableMapping[str, str] = os.environ) -> bool:
    """On CPU, turn off vLLM's ahead-of-time compile artifacts (``VLLM_USE_AOT_COMPILE=0``); True if
    turned off. A value the user set wins.

    vLLM 0.32 with torch >= 2.10 saves an AOT artifact of the compiled model, but on its CPU
    platform loading it back fails every time (``'function' object has no attribute
    'finalize_loading'``) and it compiles the model again: each compiled start cost ~8 s (14-21 s
    with the machine busy) more than it should. Without AOT artifacts vLLM uses torch inductor's
    own cache, which loads: the quickstart replica's engine init went 17.1 s -> 3.5 s on 2 cores."""
    if not on_cpu or AOT_VARIABLE in environ:
        return False
    environ[AOT_VARIABLE] = "0"
    return True


METHOD_VARIABLE = "VLLM_WORKER_MULTIPROC_METHOD"


def fork_engine_core(platform_class: Any, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Let vLLM fork its engine-core process from the server instead of spawning it; True if arranged.

    For a CPU replica whose model worker runs inside the engine core (:func:`place_worker` asked for
    it): the engine core is then the only process vLLM starts. ``vllm serve`` spawns processes (its
    CLI's safe default for accelerators; its library default is fork), and its CPU platform sets
    ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` again while it checks the config (for the workers of its
    multiprocessing executor, which this placement does not start), so the engine core imported torch
    and vLLM once more: ~5 s of a replica's start on 2 cores (serving 19.5 -> 14.1 s after ``rlbus rl``
    started, the same step times). The platform's check is wrapped to put ``fork`` back after it.
    Call before vLLM's ``cli_env_setup``: a method already in the environment is the user's, and wins."""
    if METHOD_VARIABLE in environ or environ.get(VARIABLE) != "0":
        return False
    check = platform_class.check_and_update_config  # bound to the class: a classmethod

    def check_then_fork(vllm_config: Any) -> None:
        check(vllm_config)
        environ[METHOD_VARIABLE] = "fork"

    platform_class.check_and_update_config = staticmethod(check_then_fork)
    return True
