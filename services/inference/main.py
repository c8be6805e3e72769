"""``rlbus inference``: what runs once the entry has resolved the config (vLLM is imported only then)."""

from __future__ import annotations

import sys

from loguru import logger

from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.executor import bind_cpu_threads


def run(config: InferenceConfig) -> int:
    # Before torch loads: its OpenMP runtime reads OMP_NUM_THREADS once, when it loads, and an engine
    # core forked from this process keeps the team size it read (inference.fork_engine_core).
    if "torch" in sys.modules:
        logger.warning("torch was imported before inference.cpu_threads_bind was applied: a forked engine core "
                       "keeps the OpenMP team size torch read (set inference.fork_engine_core = false)")  # fmt: skip
    if bind_cpu_threads(config.cpu_threads_bind):
        logger.debug("vLLM's CPU worker pins its threads to cores {}", config.cpu_threads_bind)
    from rlbus.services.inference.server import run_inference

    return run_inference(config)
