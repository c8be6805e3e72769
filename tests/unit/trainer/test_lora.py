"""LoRA training: config checks, a frozen base, adapter-only optimizer state, merged weights."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from rlbus.services.trainer.config import OptimizerConfig, TrainerConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.lora import (
    apply_lora,
    base_fingerprint,
    merged_tensors,
    servable_arrays,
    weight_sizes,
    with_lora,
)
from rlbus.services.trainer.lora_config import LoraConfig
from rlbus.services.trainer.model import load_model
from rlbus.services.trainer.train_step import build_optimizer

SOLO = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_model(model_dir, **overrides):
    config = LoraConfig(**{"rank": 4, "alpha": 8.0, "target_modules": TARGETS, **overrides})
    return apply_lora(load_model(str(model_dir), "float32", torch.device("cpu")), config)


def train_a_few_steps(model, steps: int = 3) -> torch.optim.Optimizer:
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.1))
    ids = torch.arange(1, 17).unsqueeze(0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("field, value", [("rank", 0), ("rank", -2), ("alpha", 0), ("dropout", 1.0),
                                          ("target_modules", []), ("target_modules", [""])])  # fmt: skip
def test_bad_lora_settings_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        LoraConfig(**{field: value})


def test_trainer_config_takes_a_lora_section(tmp_path):
    config = TrainerConfig(model=str(tmp_path), lora={"rank": 16, "target_modules": ["q_proj"]})
    assert config.lora is not None and config.lora.rank == 16 and config.lora.alpha == 16.0
    assert TrainerConfig(model=str(tmp_path)).lora is None
    with pytest.raises(ValidationError, match="rank"):
        TrainerConfig(model=str(tmp_path), lora={"rank": 0})


def test_a_target_matching_no_module_is_named(tiny_model_dir):
    with pytest.raises(ValueError, match=r"\['q_projj'\] match no linear layer.*'q_proj'"):
        lora_model(tiny_model_dir, target_modules=["q_projj", "v_proj"])


def test_targets_may_name_the_end_of_a_module_path(tiny_model_dir):
    model = lora_model(tiny_model_dir, target_modules=["self_attn.q_proj", "mlp.down_proj"])
    adapted = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert len(adapted) == 4 and all(name.endswith(("q_proj", "down_proj")) for name in adapted)


def test_lora_with_several_ranks_or_ac_is_refused_before_training(tiny_model_dir):
    model = load_model(str(tiny_model_dir), "float32", torch.device("cpu"))
    with pytest.raises(ValueError, match="2 trainer ranks"):
        with_lora(model, LoraConfig(), world_size=2, ac=0)
    with pytest.raises(ValueError, match="memory.ac"):
        with_lora(model, LoraConfig(), world_size=1, ac=1)
    assert with_lora(model, None, world_size=2, ac=1) is model


def test_training_moves_only_the_adapter(tiny_model_dir):
    plain = load_model(str(tiny_model_dir), "float32", torch.device("cpu"))
    model = lora_model(tiny_model_dir)
    before = base_fingerprint(model)
    assert before == base_fingerprint(plain)  # same hash of the same base, wrapped or not
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    optimizer = train_a_few_steps(model)
    assert base_fingerprint(model) == before
    moved = [n for n, p in model.named_parameters() if ".lora_B" in n and not torch.equal(p, adapter_before[n])]
    assert len(moved) == 2 * len(TARGETS)  # every adapted layer of both decoder layers
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trainable
    assert len(optimizer.state) == len(trainable)


def test_merged_weights_give_peft_merged_forward(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    train_a_few_steps(model)
    model.eval()
    before = base_fingerprint(model)
    merged = dict(merged_tensors(model))
    assert base_fingerprint(model) == before  # merged into copies, never in place
    served = load_model(str(tiny_model_dir), "float32", torch.device("cpu")).eval()
    served.load_state_dict(merged, strict=False)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.allclose(expected, load_model(str(tiny_model_dir), "float32", torch.device("cpu"))
                                  .eval()(input_ids=ids).logits, atol=1e-4)  # fmt: skip
        torch.testing.assert_close(served(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        reference = dict(model.merge_and_unload().named_parameters())  # PEFT's own merge (in place: last)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=1e-6)


def test_published_arrays_are_the_merged_hf_weights(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    train_a_few_steps(model, steps=1)
    arrays = {name: array for name, array, _ in servable_arrays(model, SOLO)}
    plain_names = {n for n, _ in load_model(str(tiny_model_dir), "float32", torch.device("cpu")).named_parameters()}
    assert set(arrays) == plain_names
    merged = dict(merged_tensors(model))
    assert all(torch.equal(torch.from_numpy(arrays[n]), merged[n]) for n in arrays)


def test_adapter_bytes_are_a_fraction_of_the_full_weights(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    sizes = weight_sizes(model)
    adapter = sum(p.numel() * 4 for n, p in model.named_parameters() if ".lora_" in n)
    assert sizes["weights/lora_adapter_bytes"] == adapter
    assert 0 < sizes["weights/lora_adapter_fraction"] < 0.2
    assert sizes["weights/full_bytes"] == sum(p.numel() * 4 for n, p in model.named_parameters() if ".lora_" not in n)
