"""The worker side of a weight update, over a real weight server, with a stand-in for vLLM's worker."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from rlbus.bus import Bus
from rlbus.services.inference.worker_extension import (
    RlbusWorkerExtension,
    checkpoint_shapes,
    manifest_mismatch,
    to_torch,
)
from rlbus.weights import WeightServer, WeightStore

SHAPES = {"model.embed_tokens.weight": (8, 4), "model.layers.0.mlp.down_proj.weight": (4, 6), "model.norm.weight": (4,)}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_file(
        {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}, str(tmp_path / "model.safetensors")
    )
    return tmp_path


def new_weights(seed: int) -> list[tuple[str, np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    return [(name, rng.standard_normal(shape).astype(np.float32), "float32") for name, shape in SHAPES.items()]


class FakeWorker(RlbusWorkerExtension):
    """What the extension uses of vLLM's worker: its config, model runner and reload_weights."""

    def __init__(self, model_dir: Path) -> None:
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(model=str(model_dir)))
        self.model_runner = SimpleNamespace(get_model=lambda: SimpleNamespace())
        self.loaded: list[list[tuple[str, torch.Tensor]]] = []

    def reload_weights(self, weights_iterator=None) -> None:
        self.loaded.append([(name, tensor.clone()) for name, tensor in weights_iterator])


@pytest.fixture
def weight_server(bus: Bus, endpoint):
    server = WeightServer(bus, endpoint("weights"), endpoint("announce"), WeightStore(bucket_bytes=64)).start()
    yield server
    server.stop()


def load(worker: FakeWorker, server: WeightServer, announced, bus_config) -> dict:
    return worker.rlbus_load_step(msgspec.to_builtins(announced), server.fetch_address, "replica-t",
                                  bus_config.model_dump(mode="json"))  # fmt: skip


def test_a_verified_step_is_loaded_tensor_for_tensor(model_dir, weight_server, bus_config):
    published = new_weights(1)
    announced = weight_server.publish(3, published)
    worker = FakeWorker(model_dir)
    report = load(worker, weight_server, announced, bus_config)
    assert report["ok"] and report["step"] == 3 and report["num_bytes"] == announced.total_bytes
    assert announced.num_buckets > 1, "the test store splits the step into several buckets"
    assert [name for name, _ in worker.loaded[0]] == [name for name, _, _ in published]
    for (_, tensor), (_, array, _) in zip(worker.loaded[0], published, strict=True):
        assert torch.equal(tensor, torch.from_numpy(array))


def test_a_corrupt_transfer_is_refused_and_nothing_loads(model_dir, weight_server, bus_config):
    published = new_weights(2)
    announced = weight_server.publish(4, published)
    published[1][1][0, 0] += 1.0  # the store holds the arrays by reference: tamper after the CRC was taken
    worker = FakeWorker(model_dir)
    report = load(worker, weight_server, announced, bus_config)
    assert (report["ok"], report["kind"]) == (False, "transfer")
    assert "checksum mismatch on tensor model.layers.0.mlp.down_proj.weight" in report["error"]
    assert worker.loaded == []


def test_a_step_that_does_not_fit_the_model_is_refused_before_fetching(model_dir, weight_server, bus_config):
    wrong = [(name, array.reshape(-1), dtype) for name, array, dtype in new_weights(3)]
    announced = weight_server.publish(5, wrong)
    worker = FakeWorker(model_dir)
    report = load(worker, weight_server, announced, bus_config)
    assert not report["ok"] and "has shape [32], the checkpoint has [8, 4]" in report["error"]
    assert weight_server.num_buckets_served == 0 and worker.loaded == []


def test_an_unreachable_trainer_is_a_refused_transfer(model_dir, bus_config, endpoint):
    announced = WeightStore(bucket_bytes=64).add(1, new_weights(4))
    worker = FakeWorker(model_dir)
    config = bus_config.model_copy(update={"request_timeout_s": 0.2})
    report = worker.rlbus_load_step(msgspec.to_builtins(announced), endpoint("nobody", fixed=True), "replica-t",
                                    config.model_dump(mode="json"))  # fmt: skip
    assert (report["ok"], report["kind"]) == (False, "transfer") and "bucket 0 of step 1" in report["error"]


def test_checkpoint_shapes_read_the_safetensors_headers(model_dir, tmp_path_factory):
    assert checkpoint_shapes(model_dir) == {name: list(shape) for name, shape in SHAPES.items()}
    assert checkpoint_shapes(tmp_path_factory.mktemp("empty")) is None
    assert checkpoint_shapes(Path("org/hub-name")) is None


def test_manifest_mismatch_names_the_problem(model_dir):
    shapes = checkpoint_shapes(model_dir)
    manifest = WeightStore(bucket_bytes=64).add(1, new_weights(5)).manifest
    assert manifest_mismatch(manifest, shapes) == ""
    assert manifest_mismatch(manifest, None) == "", "no checkpoint to compare with: not checked"
    with_head = WeightStore(bucket_bytes=64).add(1, [*new_weights(5), ("lm_head.weight", np.zeros((8, 4), np.float32),
                                                                        "float32")]).manifest  # fmt: skip
    assert manifest_mismatch(with_head, shapes) == "", "a tied head may be sent"
    assert "not in the checkpoint, e.g. extra" in manifest_mismatch(
        WeightStore(bucket_bytes=64).add(1, [*new_weights(5), ("extra", np.zeros(1, np.float32), "float32")]).manifest,
        shapes,
    )
    partial = WeightStore(bucket_bytes=64).add(1, new_weights(5)[:2]).manifest
    assert "partial updates are not supported: 1 checkpoint tensor(s) missing, e.g. model.norm.weight" == (
        manifest_mismatch(partial, shapes)
    )


def test_to_torch_views_float32_and_rebuilds_bfloat16_from_bits():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert torch.equal(to_torch(array, "float32"), torch.from_numpy(array))
    original = torch.randn(4, 5).to(torch.bfloat16)
    bits = original.view(torch.uint16).numpy()
    bits.flags.writeable = False  # frames arrive read-only
    assert torch.equal(to_torch(bits, "bfloat16"), original)
    with pytest.raises(ValueError, match="announced as bfloat16 arrived as float32"):
        to_torch(array, "bfloat16")
