"""``rlbus trainer`` and ``rlbus sft``: what runs once the entry has resolved the config.

Both run alone or under ``torchrun`` (``torchrun --nproc-per-node 2 -m rlbus trainer @ cfg.toml``);
ranks other than 0 log to ``logs/<service>-rank<N>.log``. Torch is imported only
once the config is valid.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from loguru import logger

from rlbus.logging import setup_logging
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.sft_config import SftConfig


def _rank_logging(config: TrainerConfig | SftConfig) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        setup_logging(f"{config.SERVICE}-rank{rank}", config.output_dir, config.log.level, config.log.json_lines)


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
        resume = ("resume with --ckpt.resume-step -1" if config.ckpt.enabled
                  else "checkpoints are off (--ckpt.enabled), so a restart begins from the start")  # fmt: skip
        logger.warning("{} got SIGTERM: stopped; {}", config.SERVICE, resume)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(config: TrainerConfig) -> int:
    _rank_logging(config)
    from rlbus.services.trainer.service import run_trainer

    return _until_sigterm(config, run_trainer)


def run_sft(config: SftConfig) -> int:
    _rank_logging(config)
    from rlbus.services.trainer import sft

    return _until_sigterm(config, sft.run_sft)
