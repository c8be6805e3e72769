"""``rlbus env-worker``: entry point."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.entry import run_config_command
from services.env_worker.config import EnvWorkerConfig


def run(config: EnvWorkerConfig) -> int:
    from services.env_worker.service import serve

    asyncio.run(serve(config))
    return 0


def main(argv: Sequence[str]) -> int:
    return run_config_command("env-worker", EnvWorkerConfig, argv, "Run environments and score rollouts.", run=run)
