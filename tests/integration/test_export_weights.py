"""``rlbus export-weights`` on shards written by 2 ranks (FSDP2 over gloo, under torchrun): in one
process, without a process group, it writes the HF folder a one-rank full save of the same state
writes, byte for byte, and transformers loads it."""

from __future__ import annotations

import pytest
import torch

from rlbus.services.cli import main
from rlbus.services.trainer.checkpoint import CheckpointManager
from rlbus.services.trainer.config import CheckpointConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.model import load_model, load_tokenizer
from tests.integration.test_checkpoint_ranks import run_ranks
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
SOLO = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_shards_of_two_ranks_export_as_a_one_rank_full_save(tiny_model_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    run_ranks(tiny_model_dir, run, num_ranks=2)
    expected = torch.load(run / "expected_step1.pt", weights_only=True)["model"]  # gathered by the 2 ranks
    # The same state, saved in the full format by one rank: its model/ is what a one-rank trainer serves.
    model = load_model(str(tiny_model_dir), "float32", SOLO.device)
    model.load_state_dict(expected)
    optimizer = torch.optim.AdamW(model.parameters())
    CheckpointManager(tmp_path / "full", CheckpointConfig(enabled=True), SOLO).save(
        1, model, optimizer, load_tokenizer(str(tiny_model_dir)), {}
    )
    full = tmp_path / "full" / "checkpoints" / "step_1" / "model"

    out = tmp_path / "exported"
    assert main(["export-weights", str(run / "checkpoints" / "step_1"), str(out), "--model", str(tiny_model_dir)]) == 0
    names = sorted(p.name for p in full.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names and "model.safetensors" in names
    for name in names:  # safetensors, config, generation config, tokenizer
        assert (out / name).read_bytes() == (full / name).read_bytes(), name

    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert AutoTokenizer.from_pretrained(out)("hi").input_ids == load_tokenizer(str(tiny_model_dir))("hi").input_ids
