"""``rlbus inference``: parse the config, then serve (vLLM is imported only after parsing)."""

from __future__ import annotations

from collections.abc import Sequence

from services.entry import run_config_command
from services.inference.config import InferenceConfig


def run(config: InferenceConfig) -> int:
    from services.inference.server import run_inference

    return run_inference(config)


def main(argv: Sequence[str]) -> int:
    return run_config_command("inference", InferenceConfig, argv, "Serve the policy with vLLM.", run=run)
