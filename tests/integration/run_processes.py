"""Finding every process of a test's run, wherever it was reparented, by a variable of its environment.

A run's services, their children (vLLM's renamed engine processes included) and a killed launcher's
orphans all inherit the environment the test started the run with; ``/proc/<pid>/environ`` shows it
(``os.environ`` changes in pytest do not show there). A value unique to the test (its ``RLBUS_HOME``,
its ``HOME``) marks every one of them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from rlbus.services.runs import process

POLL_S = 1.0


def processes_with_env(variable: str, value: str) -> set[int]:
    """Live processes (not zombies, not this one) started with ``variable=value`` in their environment."""
    marker = f"\0{variable}={value}\0".encode()
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = b"\0" + (entry / "environ").read_bytes()
        except OSError:
            continue
        stat = process.proc_stat(int(entry.name))
        if marker in environ and stat is not None and stat.state not in ("Z", "X") and int(entry.name) != os.getpid():
            found.add(int(entry.name))
    return found


def wait_all_gone(variable: str, value: str, timeout_s: float) -> set[int]:
    """Wait up to ``timeout_s`` for every process with ``variable=value`` to end; those still alive."""
    deadline = time.monotonic() + timeout_s
    while (alive := processes_with_env(variable, value)) and time.monotonic() < deadline:
        time.sleep(POLL_S)  # polling /proc: an orphan's end sends this process no signal to wait on
    return alive


def kill_all(variable: str, value: str) -> None:
    """SIGKILL every process with ``variable=value``: what a test leaves behind when it fails."""
    for pid in processes_with_env(variable, value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
