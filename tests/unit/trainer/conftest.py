"""A tiny model (2 layers, 128 wide) built once per session for the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model


def tiny_config(out: Path) -> TinyModelConfig:
    return TinyModelConfig(out=out, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                           intermediate_size=256, max_position_embeddings=512)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    return build_tiny_model(out, tiny_config(out))
