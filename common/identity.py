"""Names of processes on the bus and in the monitor: ``<service>-<host>-<pid>``.

One helper, so every service names itself the same way and a name says where
to look (which host, which process) when it shows up in a log or a health row.
"""

from __future__ import annotations

import os
import socket


def service_id(service: str, unique: int | str | None = None) -> str:
    """``<service>-<hostname>-<unique>``; ``unique`` defaults to this process's pid (an
    inference replica passes its port, which outlives the process across restarts)."""
    return f"{service}-{socket.gethostname()}-{os.getpid() if unique is None else unique}"
