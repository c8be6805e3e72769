"""``rlbus env-worker``: entry point."""

from __future__ import annotations

from collections.abc import Sequence

from services.entry import run_config_command
from services.env_worker.config import EnvWorkerConfig


def main(argv: Sequence[str]) -> int:
    return run_config_command("env-worker", EnvWorkerConfig, argv, "Run environments and score rollouts.", run=None)
