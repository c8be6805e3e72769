"""``rlbus inference``: what runs once the entry has resolved the config (vLLM is imported only then)."""

from __future__ import annotations

from rlbus.services.inference.config import InferenceConfig


def run(config: InferenceConfig) -> int:
    from rlbus.services.inference.server import run_inference

    return run_inference(config)
