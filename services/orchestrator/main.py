"""``rlbus orchestrator``: what runs once the entry has resolved the config."""

from __future__ import annotations

from rlbus.services.orchestrator.config import OrchestratorConfig


def run(config: OrchestratorConfig) -> int:
    # Imported after the config is parsed: --help and config errors answer at once.
    from rlbus.services.orchestrator.service import run_orchestrator

    return run_orchestrator(config)
