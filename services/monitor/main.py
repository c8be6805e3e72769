"""``rlbus monitor``: what runs once the entry has resolved the config."""

from __future__ import annotations

from rlbus.services.monitor.config import MonitorConfig


def run(config: MonitorConfig) -> int:
    from rlbus.services.monitor.service import run_monitor

    return run_monitor(config)
