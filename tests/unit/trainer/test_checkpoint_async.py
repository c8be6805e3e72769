"""ckpt.save_async and ckpt.weights_only: what is written, when it is on disk, what a restart finds."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from rlbus.services.trainer.checkpoint import CheckpointManager, complete_steps
from rlbus.services.trainer.ckpt_writer import BackgroundWriter, detached_copy
from rlbus.services.trainer.config import CheckpointConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.model import load_model, read_hf_weights

SOLO = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), "float32", torch.device("cpu"))


def trained_optimizer(model) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def test_an_async_checkpoint_holds_the_state_of_its_step_even_when_training_changes_it_meanwhile(
        tmp_path, model, monkeypatch):  # fmt: skip
    ckpt = CheckpointManager(tmp_path, CheckpointConfig(enabled=True, save_async=True), SOLO)
    optimizer = trained_optimizer(model)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    release = threading.Event()
    real_write = ckpt._write_checkpoint

    def held_write(*args):
        assert release.wait(30), "the test never released the write"
        return real_write(*args)

    monkeypatch.setattr(ckpt, "_write_checkpoint", held_write)
    ckpt.save(1, model, optimizer, None, {"marker": 1})  # returns while the write is held
    assert complete_steps(ckpt.checkpoints) == []
    with torch.no_grad():  # the next step changes every parameter before the write runs
        for parameter in model.parameters():
            parameter.add_(1.0)
    release.set()
    ckpt.wait()
    assert complete_steps(ckpt.checkpoints) == [1] and complete_steps(ckpt.weights) == [1]
    saved = read_hf_weights(ckpt.checkpoints / "step_1" / "model")
    for name, value in expected.items():
        assert torch.equal(saved[name], value), f"{name} holds the changed value, not step 1's"
    state = torch.load(ckpt.checkpoints / "step_1" / "optimizer.pt", weights_only=True)
    assert state["state"], "the optimizer state was not written"


def test_a_failed_background_write_is_raised_by_wait_and_by_the_next_save(tmp_path, model, monkeypatch):
    ckpt = CheckpointManager(tmp_path, CheckpointConfig(enabled=True, save_async=True), SOLO)

    def failing_write(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_checkpoint", failing_write)
    ckpt.save(1, model, trained_optimizer(model), None, {})
    with pytest.raises(OSError, match="No space left"):
        ckpt.wait()
    ckpt.save(2, model, trained_optimizer(model), None, {})
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(3, model, trained_optimizer(model), None, {})  # the step-2 failure is not swallowed


def test_sync_and_async_saves_write_the_same_files(tmp_path, model):
    optimizer = trained_optimizer(model)
    written = {}
    for mode in (False, True):
        ckpt = CheckpointManager(tmp_path / str(mode), CheckpointConfig(enabled=True, save_async=mode), SOLO)
        ckpt.save(4, model, optimizer, None, {"epoch": 0})
        ckpt.wait()
        written[mode] = sorted(str(p.relative_to(tmp_path / str(mode))) for p in (tmp_path / str(mode)).rglob("*"))
        ckpt.writer.close()
    assert written[False] == written[True]
    assert "checkpoints/step_4/optimizer.pt" in written[True]


def test_weights_only_writes_no_optimizer_state_and_a_restart_refuses_to_start_over(tmp_path, model):
    config = CheckpointConfig(enabled=True, weights_only=True, resume_step=-1)
    ckpt = CheckpointManager(tmp_path, config, SOLO)
    ckpt.save(2, model, trained_optimizer(model), None, {})
    assert complete_steps(ckpt.weights) == [2] and complete_steps(ckpt.checkpoints) == []
    assert not list(tmp_path.rglob("optimizer.pt"))
    with pytest.raises(ValueError, match=r"weights_only = true: .* holds weights of steps \[2\]"):
        CheckpointManager(tmp_path, config, SOLO).resume_step()


def test_weights_only_in_an_empty_run_folder_starts_fresh(tmp_path):
    config = CheckpointConfig(enabled=True, weights_only=True, resume_step=-1)
    assert CheckpointManager(tmp_path, config, SOLO).resume_step() is None


def test_detached_copy_copies_every_tensor_in_nested_state():
    state = {"state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    copy = detached_copy(state)
    state["state"][0]["exp_avg"].add_(5)
    assert torch.equal(copy["state"][0]["exp_avg"], torch.ones(2))
    assert copy["param_groups"] == [{"lr": 0.1}] and copy["param_groups"] is not state["param_groups"]


def test_background_writes_run_one_at_a_time_in_order():
    writer, order = BackgroundWriter(), []
    for step in range(5):
        writer.submit(order.append, step)
    writer.close()
    assert order == [0, 1, 2, 3, 4]


def test_rl_config_ckpt_flags_reach_the_trainer_unless_it_sets_its_own(tmp_path):
    from rlbus.services.run_config.rl import RlConfig

    model = tmp_path / "m"
    config = RlConfig(model=str(model), ckpt={"weights_only": True, "save_async": True})
    assert config.trainer.ckpt.weights_only and config.trainer.ckpt.save_async
    own = RlConfig(model=str(model), ckpt={"save_async": True}, trainer={"ckpt": {"save_async": False}})
    assert own.trainer.ckpt.save_async is False
    assert RlConfig(model=str(model)).trainer.ckpt.save_async is False
