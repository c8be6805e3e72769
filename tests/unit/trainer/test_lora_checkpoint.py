"""LoRA checkpoints: adapter and optimizer resume, merged servable weights, wrong adapters refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlbus.services.models.tiny import build_tiny_model
from rlbus.services.trainer.checkpoint import CheckpointManager
from rlbus.services.trainer.config import CheckpointConfig
from rlbus.services.trainer.lora import base_fingerprint, merged_tensors
from rlbus.services.trainer.lora_config import LoraConfig
from rlbus.services.trainer.model import load_model, read_hf_weights
from rlbus.services.trainer.train_step import build_optimizer
from tests.unit.trainer.conftest import tiny_config
from tests.unit.trainer.test_lora import SOLO, lora_model, train_a_few_steps

LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


def manager(tmp_path, **overrides) -> CheckpointManager:
    ckpt = CheckpointManager(tmp_path, CheckpointConfig(enabled=True, interval=1, **overrides), SOLO)
    ckpt.lora = LORA
    return ckpt


@pytest.fixture
def trained(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    return model, train_a_few_steps(model)


@pytest.mark.parametrize("save_async", [False, True])
def test_checkpoint_holds_the_adapter_and_resumes_it(tiny_model_dir, tmp_path, trained, save_async):
    model, optimizer = trained
    ckpt = manager(tmp_path, save_async=save_async, save_adapter_separately=True)
    ckpt.save(2, model, optimizer, None, {"marker": "x"})
    ckpt.wait()
    folder = tmp_path / "checkpoints" / "step_2" / "model"
    assert not (folder / "model.safetensors").exists()  # no copy of the base
    assert all("lora_" in name for name in load_file(folder / "adapter_model.safetensors"))
    assert json.loads((folder / "lora_base.json").read_text())["base_sha256"] == base_fingerprint(model)
    resumed = lora_model(tiny_model_dir)
    resumed_optimizer = build_optimizer(resumed, _opt_config())
    assert manager(tmp_path).load(2, resumed, resumed_optimizer)["marker"] == "x"
    live = dict(model.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, live[name]), name
    assert len(resumed_optimizer.state) == len(optimizer.state)
    exp_avg = [s["exp_avg"] for s in resumed_optimizer.state.values()]
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(exp_avg, optimizer.state.values(), strict=True))


def _opt_config():
    from rlbus.services.trainer.config import OptimizerConfig

    return OptimizerConfig(lr=1e-2)


def test_weights_folder_is_a_merged_servable_model(tiny_model_dir, tmp_path, trained):
    model, optimizer = trained
    ckpt = manager(tmp_path, save_adapter_separately=True)
    ckpt.save(1, model, optimizer, None, {})
    served_folder = tmp_path / "weights" / "step_1"
    merged = dict(merged_tensors(model))
    on_disk = read_hf_weights(served_folder)
    assert set(on_disk) >= set(merged) - {"lm_head.weight"}
    assert all(torch.equal(on_disk[name], merged[name]) for name in on_disk)
    served = load_model(str(served_folder), "float32", torch.device("cpu")).eval()
    ids = torch.arange(2, 30).unsqueeze(0)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert (served_folder / "adapter" / "adapter_model.safetensors").is_file()


def test_weights_only_save_without_separate_adapter(tmp_path, trained):
    model, optimizer = trained
    manager(tmp_path).save(1, model, optimizer, None, {}, weights_only=True)
    assert (tmp_path / "weights" / "step_1" / "model.safetensors").is_file()
    assert not (tmp_path / "weights" / "step_1" / "adapter").exists()
    assert not (tmp_path / "checkpoints").exists()


def test_an_adapter_of_another_base_is_refused(tmp_path, trained, tmp_path_factory):
    model, optimizer = trained
    manager(tmp_path).save(1, model, optimizer, None, {})
    other_dir = tmp_path_factory.mktemp("other-base")
    other_base = build_tiny_model(other_dir, tiny_config(other_dir).model_copy(update={"seed": 7}))
    other = lora_model(other_base)
    with pytest.raises(ValueError, match="trained on another base model"):
        manager(tmp_path).load(1, other, build_optimizer(other, _opt_config()))


def test_an_adapter_of_another_rank_is_refused(tiny_model_dir, tmp_path, trained):
    model, optimizer = trained
    manager(tmp_path).save(1, model, optimizer, None, {})
    wider = lora_model(tiny_model_dir, rank=8)
    ckpt = manager(tmp_path)
    ckpt.lora = LORA.model_copy(update={"rank": 8})
    with pytest.raises(ValueError, match="has rank 4 .* asks for rank 8"):
        ckpt.load(1, wider, build_optimizer(wider, _opt_config()))


def test_a_full_weights_checkpoint_cannot_resume_a_lora_run(tiny_model_dir, tmp_path):
    plain = load_model(str(tiny_model_dir), "float32", torch.device("cpu"))
    CheckpointManager(tmp_path, CheckpointConfig(enabled=True, interval=1), SOLO).save(
        1, plain, torch.optim.AdamW(plain.parameters()), None, {}
    )
    model = lora_model(tiny_model_dir)
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        manager(tmp_path).load(1, model, build_optimizer(model, _opt_config()))


def test_an_adapter_missing_tensors_is_refused(tmp_path, trained, tiny_model_dir):
    model, optimizer = trained
    manager(tmp_path).save(1, model, optimizer, None, {})
    weights = tmp_path / "checkpoints" / "step_1" / "model" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, weights)
    fresh = lora_model(tiny_model_dir)
    with pytest.raises(ValueError, match="lacks .* tensor"):
        manager(tmp_path).load(1, fresh, build_optimizer(fresh, _opt_config()))
