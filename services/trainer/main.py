"""``rlbus trainer`` and ``rlbus sft``: what runs once the entry has resolved the config.

Both run alone, as ``num_ranks`` ranks they start themselves (:mod:`rlbus.ranks`: the first
process becomes the rank group and starts the ranks), or under ``torchrun``. With several ranks
each logs to ``logs/<service>/rank_<N>.log`` and only rank 0 to the console (and to
``logs/<service>.log``). Torch is imported only once the config is valid, and never by a rank group.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from loguru import logger

from rlbus.logging import FILE_FORMAT, setup_logging
from rlbus.ranks import is_rank, rank_log_path, run_ranks
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.sft_config import SftConfig


def _rank_logging(config: TrainerConfig | SftConfig) -> None:
    """With several ranks: rank 0 also logs to its rank file, the others only there (not the console)."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return
    path, level = rank_log_path(config.output_dir, config.SERVICE, rank), config.log.level.upper()
    if rank > 0:
        setup_logging(f"{config.SERVICE}-rank{rank}", None, config.log.level, config.log.json_lines, console=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.add(path, level=level, format=FILE_FORMAT, serialize=config.log.json_lines, enqueue=False)


def _as_rank_group(config: TrainerConfig | SftConfig) -> int | None:
    """With ``num_ranks`` > 1 (or ``NNODES`` > 1: one node of several) in a process not started as a
    rank: start the ranks, wait, their exit code. They run the resolved config this process wrote
    (``configs/<service>.toml``: all it was given)."""
    one_node = int(os.environ.get("NNODES", "1")) <= 1
    if is_rank(os.environ) or (config.num_ranks <= 1 and one_node):
        return None
    resolved = config.output_dir / "configs" / f"{config.SERVICE}.toml"
    argv = [sys.executable, "-m", "rlbus", config.SERVICE.replace("_", "-"), "@", str(resolved)]
    return run_ranks(argv, config.num_ranks, config.output_dir, config.SERVICE)


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (what the launcher, torchrun and ``kill`` send).

    Python's default SIGTERM action ends the process without a word; raising instead
    runs every ``finally`` (weight server, process group) and leaves a line in the log.
    A BaseException, so that no ``except Exception`` on the way swallows it.
    """


def _raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated


def _until_sigterm(config: TrainerConfig | SftConfig, run: Callable[[Any], int]) -> int:
    """``run(config)``; on SIGTERM, log where the run can resume and exit 143 (128 + SIGTERM)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run(config)
    except Terminated:
        resume = _resume_hint(config)
        logger.warning("{} got SIGTERM: stopped; {}", config.SERVICE, resume)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(config: TrainerConfig) -> int:
    group = _as_rank_group(config)
    if group is not None:
        return group
    _rank_logging(config)
    from rlbus.services.trainer.service import run_trainer

    return _until_sigterm(config, run_trainer)


def run_sft(config: SftConfig) -> int:
    group = _as_rank_group(config)
    if group is not None:
        return group
    _rank_logging(config)
    from rlbus.services.trainer import sft

    return _until_sigterm(config, sft.run_sft)


def _resume_hint(config: TrainerConfig | SftConfig) -> str:
    shared = getattr(config, "max_concurrent_runs", None) is not None
    if not config.ckpt.enabled:
        if shared:
            return "checkpoints are off (--ckpt.enabled): a restarted shared trainer starts each run's adapter afresh"
        return "checkpoints are off (--ckpt.enabled), so a restart begins from the start"
    if shared:
        return "a restarted shared trainer resumes each run that joins again from runs/<run_id>/checkpoints"
    return "resume with --ckpt.resume-step -1"
