"""How long an idle vLLM worker keeps spinning for work before it sleeps (``inference.worker_idle_spin_s``).

vLLM's engine hands each step to its worker process through a shared-memory
queue whose reader spins (``sched_yield`` in a loop) for one second after every
step before it sleeps on a socket: on a GPU box that hides a few microseconds of
wake-up. On a machine whose CPU cores the replica shares with the trainer (a
laptop, the CPU quickstart) it burns a core for a second after every generation
burst, exactly when the trainer needs it: measured on 2 cores, the trainer's
forward/backward went from 2.4 s to 1.5 s a step with a 5 ms spin. The queue
notifies a sleeping reader over a socket, so a short spin only costs that
wake-up, except when the notification is lost: vLLM's parked reader then only
re-checks the queue after ``SHM_READER_RECHECK_INTERVAL_MS`` (5 s). A worker that
parks after every step made one generation in ten or so take 5 s longer
(measured: 6.1-6.4 s instead of 1.1-1.5 s), so with a short spin the re-check
interval is cut to :data:`RECHECK_MS` as well: a lost wake-up then costs
milliseconds, and a parked worker's periodic flag check stays negligible.

The spin time is a default argument of vLLM's ``SpinCondition`` and the re-check
interval a module constant (vLLM 0.32); no option exposes either: the server passes the configured value to its workers
in :data:`ENV_VAR`, and :func:`apply_in_worker` (run when vLLM imports our
worker extension, before the worker opens its queues) sets it. Where vLLM has
no such class any more, the worker says so once and keeps vLLM's behaviour.
"""

from __future__ import annotations

import os
import warnings

RECHECK_MS = 10
"""How often a parked worker re-reads the queue's written flag (vLLM: every 5000 ms)."""
ENV_VAR = "_RLBUS_WORKER_IDLE_SPIN_S"
"""Set by the inference server for its vLLM processes; not a config variable (no ``RLBUS_`` prefix)."""


def export_for_workers(spin_s: float | None) -> None:
    """Hand ``spin_s`` to the vLLM processes this one starts (None: vLLM's own default)."""
    if spin_s is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = repr(float(spin_s))


def apply_in_worker() -> float | None:
    """Set the spin time of the queues this worker opens from now on; the value set, or None."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    try:
        from vllm.distributed.device_communicators import shm_broadcast

        defaults = shm_broadcast.SpinCondition.__init__.__defaults__
        recheck_ms = shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS
    except (ImportError, AttributeError):
        defaults, recheck_ms = None, None
    if not defaults or not isinstance(defaults[-1], int | float) or not isinstance(recheck_ms, int):
        warnings.warn("inference.worker_idle_spin_s: this vLLM has no SpinCondition(busy_loop_s=...) or "
                      "SHM_READER_RECHECK_INTERVAL_MS; its workers keep their own idle spin", RuntimeWarning,
                      stacklevel=2)  # fmt: skip
        return None
    shm_broadcast.SpinCondition.__init__.__defaults__ = (*defaults[:-1], float(value))
    shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = min(recheck_ms, RECHECK_MS)
    return float(value)
