"""``rlbus rl``: entry point of the launcher."""

from __future__ import annotations

from collections.abc import Sequence

from services.entry import run_config_command
from services.launcher.config import RlConfig


def main(argv: Sequence[str]) -> int:
    from services.launcher.run import run_rl

    return run_config_command("rl", RlConfig, argv, "Start every service locally from one merged config.",
                              run=run_rl)  # fmt: skip
