"""``rlbus orchestrator`` and ``rlbus eval``: entry points."""

from __future__ import annotations

import os
from collections.abc import Sequence

from services.entry import run_config_command
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.eval_run import EvalRunConfig

EVAL_SUMMARY = (
    "Evaluate the [[eval.env]] environments once against an OpenAI-compatible endpoint (--client.base-url).\n"
    "Takes the orchestrator's config, e.g. <output_dir>/configs/orchestrator.toml."
)


def _run(config: OrchestratorConfig) -> int:
    # Imported after the config is parsed: --help and config errors answer at once.
    from services.orchestrator.service import run_orchestrator

    return run_orchestrator(config)


def _run_eval(config: EvalRunConfig) -> int:
    from services.orchestrator.eval_run import run_eval

    return run_eval(config)


def main(argv: Sequence[str]) -> int:
    return run_config_command("orchestrator", OrchestratorConfig, argv, "Schedule rollouts and pack batches.", run=_run)


def eval_main(argv: Sequence[str]) -> int:
    from services.launcher.config import service_env

    # The eval config is the orchestrator's plus [client]: environment values are read as the orchestrator's.
    env = service_env("orchestrator", os.environ)
    return run_config_command("eval", EvalRunConfig, argv, EVAL_SUMMARY, run=_run_eval, env=env)
