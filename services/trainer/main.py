"""``rlbus trainer`` and ``rlbus sft``: entry points.

Both run alone or under ``torchrun`` (``torchrun --nproc-per-node 2 -m services.trainer @ cfg.toml``);
ranks other than 0 log to ``logs/<service>-rank<N>.log``. Torch is imported only
once the config is valid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from common.logging import setup_logging
from services.entry import run_config_command
from services.trainer.config import TrainerConfig
from services.trainer.sft_config import SftConfig


def _rank_logging(config: TrainerConfig | SftConfig) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        setup_logging(f"{config.SERVICE}-rank{rank}", config.output_dir, config.log.level, config.log.json_lines)


def _run_trainer(config: TrainerConfig) -> int:
    _rank_logging(config)
    from services.trainer.service import run_trainer

    return run_trainer(config)


def _run_sft(config: SftConfig) -> int:
    _rank_logging(config)
    from services.trainer.sft import run_sft

    return run_sft(config)


def main(argv: Sequence[str]) -> int:
    return run_config_command("trainer", TrainerConfig, argv, "Train on batches and publish weights.", run=_run_trainer)


def sft_main(argv: Sequence[str]) -> int:
    return run_config_command("sft", SftConfig, argv, "Supervised fine-tuning.", run=_run_sft)
