"""``rlbus inference``: entry point (the service itself arrives with its issue)."""

from __future__ import annotations

from collections.abc import Sequence

from services.entry import run_config_command
from services.inference.config import InferenceConfig


def main(argv: Sequence[str]) -> int:
    return run_config_command("inference", InferenceConfig, argv, "Serve the policy with vLLM.", run=None)
