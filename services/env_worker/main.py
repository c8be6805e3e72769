"""``rlbus env-worker``: what runs once the entry has resolved the config."""

from __future__ import annotations

import asyncio

from rlbus.services.env_worker.config import EnvWorkerConfig


def run(config: EnvWorkerConfig) -> int:
    from rlbus.services.env_worker.service import serve

    asyncio.run(serve(config))
    return 0
