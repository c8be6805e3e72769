"""inference.worker_idle_spin_s reaches vLLM's worker queues through the environment of its processes."""

from __future__ import annotations

import os
import subprocess
import sys

from rlbus.services.inference.idle_spin import ENV_VAR, export_for_workers


def spin_in_a_fresh_worker(env: dict[str, str]) -> str:
    """What a process that imports our worker extension (as vLLM's worker does) ends up with."""
    code = ("import rlbus.services.inference.worker_extension\n"
            "from vllm.distributed.device_communicators import shm_broadcast as shm\n"
            "print(shm.SpinCondition.__init__.__defaults__[-1], shm.SHM_READER_RECHECK_INTERVAL_MS)")  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=True).stdout.strip()  # fmt: skip


def test_the_configured_spin_is_set_in_the_worker_and_none_keeps_vllms():
    export_for_workers(0.005)
    assert os.environ[ENV_VAR] == "0.005"
    # A short spin comes with a short re-check, so a lost wake-up costs milliseconds, not vLLM's 5 s.
    assert spin_in_a_fresh_worker(dict(os.environ)) == "0.005 10"
    export_for_workers(None)
    assert ENV_VAR not in os.environ
    assert spin_in_a_fresh_worker(dict(os.environ)) == "1 5000"
