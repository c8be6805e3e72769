"""``rlbus trainer`` and ``rlbus sft``: entry points."""

from __future__ import annotations

from collections.abc import Sequence

from services.entry import run_config_command
from services.trainer.config import TrainerConfig


def main(argv: Sequence[str]) -> int:
    return run_config_command("trainer", TrainerConfig, argv, "Train on batches and publish weights.", run=None)


def sft_main(argv: Sequence[str]) -> int:
    return run_config_command("sft", TrainerConfig, argv, "Supervised fine-tuning.", run=None)
