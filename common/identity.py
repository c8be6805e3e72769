"""Names of processes on the bus and in the monitor: ``<service>-<host>-<pid>``.

One helper, so every service names itself the same way and a name says where
to look (which host, which process) when it shows up in a log or a health row.
"""

from __future__ import annotations

import os
import re
import socket

MAX_RUN_ID = 64
SAFE_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def service_id(service: str, unique: int | str | None = None) -> str:
    """``<service>-<hostname>-<unique>``; ``unique`` defaults to this process's pid (an
    inference replica passes its port, which outlives the process across restarts)."""
    return f"{service}-{socket.gethostname()}-{os.getpid() if unique is None else unique}"


def run_id_problem(run_id: str) -> str | None:
    """Why ``run_id`` cannot name a run on a shared trainer (its adapter and its checkpoint folder),
    or None when it can. The launcher's checks and the trainer apply the same rule."""
    if not run_id:
        return "it is empty"
    if len(run_id) > MAX_RUN_ID:
        return f"it has {len(run_id)} characters, more than {MAX_RUN_ID}"
    if not SAFE_RUN_ID.fullmatch(run_id):
        # '.' also splits PEFT's module names; '/' and '\\' would leave the run's folder. A subset of
        # the names inference serves adapters under (messages.ADAPTER_NAME_PATTERN).
        return "use only letters, digits, '_' and '-', starting with a letter or digit (no '.', '/' or '\\')"
    if run_id in "lora_":
        # PEFT finds adapter tensors by name and may re-initialise an adapter named like this.
        return "it is part of PEFT's parameter prefix 'lora_'"
    return None
