"""A LoRA run's weight channel: only the adapter travels, in PEFT's saved names, with its metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zmq
from pydantic import ValidationError
from safetensors.numpy import load_file

from rlbus.bus import Bus
from rlbus.config.base import BusConfig, BusEndpoints
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.lora import adapter_tensor_name, apply_lora, base_fingerprint, weight_sizes
from rlbus.services.trainer.lora_config import LoraConfig
from rlbus.services.trainer.model import load_model
from rlbus.services.trainer.service import WeightPublisher
from rlbus.weights import fetch_step, query_latest

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "name": "run-a"}


def lora_model(model_dir):
    model = apply_lora(load_model(str(model_dir), "float32", CTX.device), LoraConfig(**LORA))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    return model


def publish_and_fetch(model_dir, model, transfer: str):
    endpoints = BusEndpoints(trainer_weights="tcp://127.0.0.1:*", trainer_announce="tcp://127.0.0.1:*")
    config = TrainerConfig(model=str(model_dir), lora=LoraConfig(**LORA, transfer=transfer),
                           bus=BusConfig(endpoints=endpoints))  # fmt: skip
    with Bus(BusConfig(linger_ms=0, request_timeout_s=10)) as bus:
        publisher = WeightPublisher(bus, config, CTX)
        try:
            publisher.publish(3, model)
            sock = bus.connect(zmq.DEALER, publisher.server.fetch_address, "weights-client")
            # An adapter's steps are asked for by its name; merged transfers publish full weights ("").
            adapter = LORA["name"] if transfer == "adapter" else ""
            announced = query_latest(bus, sock, "replica-0", timeout_s=10, adapter=adapter)
            tensors = {name: array for name, array, _ in fetch_step(bus, sock, announced, "replica-0", 10)}
        finally:
            publisher.stop()
    return announced, tensors, publisher.published_bytes


def test_only_the_adapter_travels_in_the_names_peft_saves(tiny_model_dir, tmp_path):
    model = lora_model(tiny_model_dir)
    announced, tensors, sent = publish_and_fetch(tiny_model_dir, model, "adapter")
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    saved = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(saved)  # what vLLM reads from a PEFT folder, no ".default"
    for name, array in tensors.items():
        np.testing.assert_array_equal(array, saved[name])
    assert sent == announced.total_bytes == weight_sizes(model)["weights/lora_adapter_bytes"]
    lora = announced.lora
    assert (lora.name, lora.rank, lora.alpha, lora.target_modules) == ("run-a", 4, 8.0, ["q_proj", "v_proj"])
    assert lora.base_fingerprint == base_fingerprint(model)
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (lora.rank, lora.alpha)


def test_merged_transfer_sends_the_full_weights_without_adapter_metadata(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    announced, tensors, sent = publish_and_fetch(tiny_model_dir, model, "merged")
    assert announced.lora is None and sent == weight_sizes(model)["weights/full_bytes"]
    assert not any(".lora_" in name for name in tensors) and "model.embed_tokens.weight" in tensors


def test_adapter_tensor_names_drop_only_the_adapters_own_name():
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert adapter_tensor_name(name) == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65, "a b"])
def test_adapter_names_that_could_leave_a_folder_are_refused(name):
    with pytest.raises(ValidationError, match="name"):
        LoraConfig(name=name)
