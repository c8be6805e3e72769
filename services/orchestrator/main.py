"""``rlbus orchestrator`` and ``rlbus eval``: entry points."""

from __future__ import annotations

from collections.abc import Sequence

from services.entry import run_config_command
from services.orchestrator.config import OrchestratorConfig


def main(argv: Sequence[str]) -> int:
    return run_config_command("orchestrator", OrchestratorConfig, argv, "Schedule rollouts and pack batches.", run=None)


def eval_main(argv: Sequence[str]) -> int:
    return run_config_command("eval", OrchestratorConfig, argv, "Evaluate environments once.", run=None)
