"""torch.compile's CPU vector-ISA probe, run by the server while it starts, not in the engine's warm-up.

Before it builds or loads its first CPU kernel, torch inductor checks every vector ISA the CPU
reports (AVX2, AVX-512 and its VNNI and BF16 forms, AMX here) by compiling a test kernel with its
flags and loading it in a child Python that links libtorch (``torch._inductor.cpu_vec_isa``,
``valid_vec_isa_list``). It does so in every process, even with every kernel in its cache: py-spy
showed the engine core's warm-up (``warming_up_model``) waiting ~1.4 s on those children on this
2-core machine, in the middle of a replica's start.

The answers live in the module (``functools.cache``), so a probe that ran in the server before vLLM
forks its engine core (``inference.fork_engine_core``) is inherited by it. The server starts the probe
on a thread as soon as vLLM has set up its environment and imported torch, so that it runs (its
children on the other core) during the ~5 s of vLLM's remaining imports, and joins it before the
engine forks, so the fork never copies a half-done probe. The answers are torch's own, probed by this
process: nothing is assumed or stored. A spawned engine core (the worker in a process of its own, or
``VLLM_WORKER_MULTIPROC_METHOD`` set) or any failure here probes for itself, as before.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable
from typing import Any

from loguru import logger


class IsaProbe:
    """Inductor's ISA probe on a thread of the server (``start``), finished before the fork (``join``)."""

    def __init__(self) -> None:
        self.isas: list[str] = []
        """The ISAs that passed, best first, once joined (empty if the probe failed)."""
        self._thread: threading.Thread | None = None
        self._started_at = 0.0

    def start(self) -> IsaProbe:
        # What the probe imports, imported here on the server's thread (vLLM has, by now): the server
        # goes on importing while the probe runs, and two threads importing modules that import each
        # other can see one of them half-loaded.
        import torch._inductor.codecache
        import torch._inductor.cpp_builder
        import torch.utils._filelock  # noqa: F401
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        self._started_at = time.perf_counter()
        self._thread = threading.Thread(target=self._probe, args=(valid_vec_isa_list,), name="rlbus-isa-probe",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def join(self) -> None:
        """Wait for the probe (bounded by torch: 60 s a child); the engine may fork after this."""
        waiting_since = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        logger.debug("inductor's ISA probe: {} ({:.2f}s, {:.2f}s of it waited for)", ", ".join(self.isas) or "none",
                     time.perf_counter() - self._started_at, time.perf_counter() - waiting_since)  # fmt: skip

    def _probe(self, valid_vec_isa_list: Callable[[], list[Any]]) -> None:
        try:
            self.isas = [str(isa) for isa in valid_vec_isa_list()]
        except Exception as exc:  # noqa: BLE001 - only a head start: the engine core probes itself then
            logger.debug("inductor's ISA probe failed in the server ({}: {}); the engine core probes itself",
                         type(exc).__name__, exc)  # fmt: skip


def start_isa_probe(engine_forked: bool, compiled: bool) -> IsaProbe | None:
    """The probe, started, when the engine core will be forked from this process and compiles its
    model on an x86 CPU (elsewhere inductor probes nothing this slow); else None."""
    if not (engine_forked and compiled and platform.machine() in ("x86_64", "AMD64")):
        return None
    return IsaProbe().start()
