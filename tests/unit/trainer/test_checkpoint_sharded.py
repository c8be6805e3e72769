"""``ckpt.format = "sharded"`` on one rank: what is written, what loads, and switching formats.
(Several ranks writing and fewer resuming: tests/integration/test_checkpoint_ranks.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from rlbus.services.trainer.checkpoint import CheckpointManager, _full_optimizer_state, complete_steps
from rlbus.services.trainer.ckpt_sharded import check_shards_complete
from rlbus.services.trainer.config import CheckpointConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.model import load_model

SOLO = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def trained(model_dir, tokens: tuple[int, ...] = (1, 2, 3)) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and optimizer after one step on ``tokens`` (other tokens: another state)."""
    model = load_model(str(model_dir), "float32", SOLO.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([tokens])).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def assert_same_state(a: tuple, b: tuple) -> None:
    for (name, x), y in zip(a[0].named_parameters(), b[0].parameters(), strict=True):
        assert torch.equal(x, y), name
    for name, state in _full_optimizer_state(*a)["state"].items():
        other = _full_optimizer_state(*b)["state"][name]
        assert all(torch.equal(state[k], other[k]) for k in state), name


@pytest.mark.parametrize("save_async", [False, True])
def test_a_sharded_checkpoint_holds_shards_progress_and_servable_weights(tiny_model_dir, tmp_path, save_async):
    model, optimizer = trained(tiny_model_dir)
    ckpt = CheckpointManager(tmp_path, CheckpointConfig(enabled=True, format="sharded", save_async=save_async), SOLO)
    ckpt.save(3, model, optimizer, None, {"epoch": 1})
    ckpt.wait()
    folder = tmp_path / "checkpoints" / "step_3"
    assert sorted(p.name for p in folder.iterdir()) == ["progress.json", "shards"]
    assert sorted(p.name for p in (folder / "shards").iterdir()) == [".metadata", "__0_0.distcp"]
    assert json.loads((folder / "progress.json").read_text())["format"] == "sharded"
    served = load_model(str(tmp_path / "weights" / "step_3"), "float32", SOLO.device)
    for (name, a), b in zip(model.named_parameters(), served.parameters(), strict=True):
        assert torch.equal(a, b), name
    fresh = trained(tiny_model_dir, tokens=(7, 5))  # another state, for the load to overwrite
    with pytest.raises(AssertionError):
        assert_same_state((model, optimizer), fresh)
    assert ckpt.load(3, *fresh)["epoch"] == 1
    assert_same_state((model, optimizer), fresh)


@pytest.mark.parametrize(("written", "resumed"), [("full", "sharded"), ("sharded", "full")])
def test_a_run_resumes_from_the_format_it_wrote_whatever_the_format_now(tiny_model_dir, tmp_path, written, resumed):
    model, optimizer = trained(tiny_model_dir)
    CheckpointManager(tmp_path, CheckpointConfig(enabled=True, format=written), SOLO).save(
        2, model, optimizer, None, {}
    )
    ckpt = CheckpointManager(tmp_path, CheckpointConfig(enabled=True, format=resumed, resume_step=-1), SOLO)
    assert ckpt.resume_step() == 2
    fresh = trained(tiny_model_dir, tokens=(7, 5))
    ckpt.load(2, *fresh)
    assert_same_state((model, optimizer), fresh)


def test_weights_only_writes_no_shards(tiny_model_dir, tmp_path):
    config = CheckpointConfig(enabled=True, format="sharded", weights_only=True)
    CheckpointManager(tmp_path, config, SOLO).save(1, *trained(tiny_model_dir), None, {})
    assert complete_steps(tmp_path / "weights") == [1] and not (tmp_path / "checkpoints").exists()


def test_shards_missing_from_the_folder_are_named(tiny_model_dir, tmp_path):
    CheckpointManager(tmp_path, CheckpointConfig(enabled=True, format="sharded"), SOLO).save(
        1, *trained(tiny_model_dir), None, {}
    )
    shards = tmp_path / "checkpoints" / "step_1" / "shards"
    check_shards_complete(shards)
    (shards / "__0_0.distcp").unlink()  # what a rank on another host without a shared disk leaves
    with pytest.raises(RuntimeError, match=r"lacks \['__0_0.distcp'\].*filesystem every rank shares"):
        check_shards_complete(shards)
