"""A sharded checkpoint written by 2 ranks (FSDP2, in the background) resumes on 1 rank: the same
parameters and optimizer state, and step 2 gives the loss the 2 ranks got without interruption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlbus.services.trainer.checkpoint import CheckpointManager, _full_optimizer_state, complete_steps
from rlbus.services.trainer.config import CheckpointConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.model import load_model, read_hf_weights
from tests.conftest import free_tcp_port
from tests.integration.ckpt_ranks import build, share
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
SOLO = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TIMEOUT_S = 300


def run_ranks(model_dir: Path, out: Path, num_ranks: int) -> None:
    script = Path(__file__).with_name("ckpt_ranks.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(num_ranks),
               "--master-port", str(free_tcp_port()), str(script), str(model_dir), str(out)]  # fmt: skip
    root = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, check=True, timeout=TIMEOUT_S, env=env)


def assert_equal_states(actual: dict, expected: dict, where: str) -> None:
    """Nested dicts of tensors and plain values, compared exactly."""
    assert actual.keys() == expected.keys(), where
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_equal_states(actual[key], value, f"{where}.{key}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), f"{where}.{key}"
        else:
            assert actual[key] == value, f"{where}.{key}"


def test_two_ranks_write_shards_that_one_rank_resumes_from(tiny_model_dir, tmp_path):  # noqa: F811
    run_ranks(tiny_model_dir, tmp_path, num_ranks=2)
    step_folder = tmp_path / "checkpoints" / "step_1"
    assert sorted(p.name for p in (step_folder / "shards").iterdir()) == [".metadata", "__0_0.distcp",
                                                                          "__1_0.distcp"]  # fmt: skip
    assert not (step_folder / "optimizer.pt").exists() and not (step_folder / "model").exists()
    expected = torch.load(tmp_path / "expected_step1.pt", weights_only=True)
    two_rank_losses = {int(k): v for k, v in json.loads((tmp_path / "losses.json").read_text()).items()}

    model, optimizer, trainer = build(str(tiny_model_dir), SOLO, ac=0)
    ckpt = CheckpointManager(tmp_path, CheckpointConfig(enabled=True, resume_step=-1), SOLO)  # format: full
    assert ckpt.resume_step() == 1
    progress = ckpt.load(1, model, optimizer)
    assert progress["world_size"] == 2 and progress["format"] == "sharded" and progress["marker"] == "ranks"

    assert_equal_states(model.state_dict(), expected["model"], "model")
    assert_equal_states(_full_optimizer_state(model, optimizer), expected["optimizer"], "optimizer")
    # The servable HF weights were gathered from the shards: the same tensors, loadable by transformers.
    served = read_hf_weights(tmp_path / "weights" / "step_1")
    for name, tensor in served.items():
        assert torch.equal(tensor, expected["model"][name]), name
    assert load_model(str(tmp_path / "weights" / "step_1"), "float32", SOLO.device) is not None

    resumed_loss = trainer.run(2, *share(2, SOLO))["loss/mean"]
    assert resumed_loss == pytest.approx(two_rank_losses[2], rel=1e-5, abs=1e-7)
    assert complete_steps(ckpt.checkpoints) == [1]
