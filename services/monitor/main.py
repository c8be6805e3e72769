"""``rlbus monitor`` and ``rlbus tail``: entry points."""

from __future__ import annotations

from collections.abc import Sequence

from services.entry import run_config_command
from services.monitor.config import MonitorConfig


def main(argv: Sequence[str]) -> int:
    return run_config_command("monitor", MonitorConfig, argv, "Collect telemetry from every service.", run=None)


def tail_main(argv: Sequence[str]) -> int:
    return run_config_command("tail", MonitorConfig, argv, "Live view of a running job.", run=None)
