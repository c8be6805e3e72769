"""Environments loaded once per process, shared by every rollout that uses them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from loguru import logger

from rlbus.environments.base import Environment
from rlbus.environments.registry import EnvironmentUnavailable, load_environment


class EnvironmentCache:
    """Loads each (env id, args) once per process; a load that failed keeps failing with its reason,
    unless its server was unavailable (:class:`EnvironmentUnavailable`): that is tried again."""

    def __init__(self, loader: Callable[[str, dict[str, Any]], Environment] = load_environment) -> None:
        self.loader = loader
        self._loaded: dict[str, Environment | Exception] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, env_id: str, args: dict[str, Any]) -> Environment:
        key = json.dumps([env_id, args], sort_keys=True)
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._loaded:
                try:
                    self._loaded[key] = await asyncio.to_thread(self.loader, env_id, args)
                    logger.info("loaded environment {} {}", env_id, args)
                except EnvironmentUnavailable as exc:
                    logger.error("cannot load environment {} {} (will try again): {}", env_id, args, exc)
                    raise
                except Exception as exc:  # noqa: BLE001 - reported in every rollout of its tasks
                    logger.error("cannot load environment {} {}: {}", env_id, args, exc)
                    self._loaded[key] = exc
        loaded = self._loaded[key]
        if isinstance(loaded, Exception):
            raise loaded
        return loaded
