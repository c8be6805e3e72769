"""LoRA adapter steps on a replica: hostile metadata refused, PEFT folders written, loads in place
by name through vLLM's registry (fake engine and registry here; the real one: test_lora_rl.py)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from functools import partial
from pathlib import Path

import msgpack
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlbus.bus import Bus, BusError
from rlbus.codec import DecodeError, decode, encode
from rlbus.config.base import BusConfig
from rlbus.messages import LoraAdapterMeta, TensorMeta, WeightsAnnounced
from rlbus.services.inference.adapters import (
    AdapterFolders,
    AdapterRefused,
    check_adapter_manifest,
    check_adapter_meta,
)
from rlbus.services.inference.engine import AdapterLoader, EngineWeightLoader
from rlbus.services.inference.worker_extension import pull_step
from rlbus.weights import WeightsCorrupt, WeightServer, WeightStore, checksum

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"
META = LoraAdapterMeta(name="run-a", rank=2, alpha=4.0, target_modules=["q_proj"], base_fingerprint="ab12")


def adapter_tensors(scale: float = 1.0) -> list[tuple[str, np.ndarray, str]]:
    a = np.full((2, 8), scale, np.float32)
    b = np.arange(16, dtype=np.float32).reshape(8, 2) * scale
    return [(f"{PREFIX}.lora_A.weight", a, "float32"), (f"{PREFIX}.lora_B.weight", b, "float32")]


def announcement(step: int = 1, meta: LoraAdapterMeta | None = META, tensors=None) -> WeightsAnnounced:
    tensors = adapter_tensors() if tensors is None else tensors
    manifest = [TensorMeta(name=name, dtype=dtype, shape=list(array.shape), nbytes=array.nbytes, bucket=0,
                           checksum=checksum(array)) for name, array, dtype in tensors]  # fmt: skip
    return WeightsAnnounced(step=step, manifest=manifest, num_buckets=1, total_bytes=sum(m.nbytes for m in manifest),
                            published_at=float(step), lora=meta)  # fmt: skip


def test_the_adapter_metadata_round_trips_and_older_peers_are_refused_by_version():
    announced = announcement()
    assert decode(encode(announced)) == announced
    frames = encode(announced)
    frames[0] = msgpack.packb(["WeightsAnnounced", 2, 0])
    with pytest.raises(DecodeError, match="schema version 2 not supported"):
        decode(frames)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 0}, "rank 0"),
        ({"rank": 64}, "rank 64"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj", "../x"]}, "target_modules"),
        ({"name": "../../etc"}, "not allowed"),
        ({"name": "a/b"}, "not allowed"),
        ({"name": ""}, "not allowed"),
        ({"name": "base-model"}, "base model"),
    ],
)
def test_hostile_adapter_metadata_is_refused_by_name(changes, message):
    meta = LoraAdapterMeta(**{**{f: getattr(META, f) for f in META.__struct_fields__}, **changes})
    with pytest.raises(AdapterRefused, match=message):
        check_adapter_meta(meta, max_lora_rank=16, served_model_name="base-model")


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([], "without tensors"),
        ([("model.layers.0.self_attn.q_proj.weight", np.zeros((8, 8), np.float32), "float32")], "not a LoRA"),
        ([(f"{PREFIX}.lora_A.default.weight", np.zeros((2, 8), np.float32), "float32")], "not a LoRA"),
        ([(f"{PREFIX}.lora_A.weight", np.zeros((3, 8), np.float32), "float32")], "does not fit rank 2"),
        (adapter_tensors()[:1], "came without"),
    ],
)
def test_a_manifest_that_is_not_this_adapter_is_refused(tensors, message):
    with pytest.raises(AdapterRefused, match=message):
        check_adapter_manifest(META, announcement(tensors=tensors).manifest)


def test_the_folder_is_a_peft_adapter_and_only_the_serving_one_is_kept(tmp_path):
    folders = AdapterFolders(tmp_path / "adapters", "models/tiny")
    first = folders.write(META, 1, adapter_tensors(1.0))
    second = folders.write(META, 2, adapter_tensors(2.0))
    assert first != second and first.parent == second.parent == tmp_path / "adapters" / "run-a"
    saved = load_file(str(second / "adapter_model.safetensors"))
    np.testing.assert_array_equal(saved[f"{PREFIX}.lora_B.weight"], adapter_tensors(2.0)[1][1])
    config = json.loads((second / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == ("LORA", 2, 4.0,
                                                                                                  ["q_proj"])  # fmt: skip
    folders.keep_only("run-a", second)
    assert sorted(p.name for p in second.parent.iterdir()) == [second.name]


class FakeEngine:
    """vLLM's AsyncLLM, as far as adapter loads use it."""

    def __init__(self) -> None:
        self.added: list = []
        self.num_cache_resets = 0
        self.refuse = ""

    async def add_lora(self, request) -> bool:
        if self.refuse:
            raise RuntimeError(self.refuse)
        self.added.append((request.lora_name, request.lora_int_id, request.lora_path, request.load_inplace))
        return True

    async def reset_prefix_cache(self) -> bool:
        self.num_cache_resets += 1
        return True


class FakeModels:
    """vLLM's OpenAIServingModels: the registry completions resolve ``model`` against."""

    def __init__(self) -> None:
        from vllm.utils.counter import AtomicCounter

        self.lora_requests: dict = {}
        self.lora_id_counter = AtomicCounter(0)
        self.lora_resolver_lock: dict = defaultdict(asyncio.Lock)

    def model_name(self) -> str:
        return "models/tiny"


def loader(tmp_path: Path, fetch=None):
    engine, models = FakeEngine(), FakeModels()
    fetched: list[int] = []

    def default_fetch(announced):
        fetched.append(announced.step)
        return adapter_tensors(float(announced.step))

    adapters = AdapterLoader(engine, lambda: models, AdapterFolders(tmp_path, "models/tiny"), 16,
                             fetch or default_fetch)  # fmt: skip
    return EngineWeightLoader(engine, "tcp://unused", "r", None, adapters), engine, models, fetched


def test_each_step_replaces_the_adapter_in_place_under_its_name(tmp_path):
    weights, engine, models, _ = loader(tmp_path)
    reports = [asyncio.run(weights.load_step(announcement(step))) for step in (1, 2)]
    size = sum(array.nbytes for _, array, _ in adapter_tensors())
    assert [(r.ok, r.step, r.num_bytes) for r in reports] == [(True, 1, size), (True, 2, size)]
    assert [(name, lora_id, inplace) for name, lora_id, _, inplace in engine.added] == [("run-a", 1, True),
                                                                                        ("run-a", 1, True)]  # fmt: skip
    served = models.lora_requests["run-a"]
    # Completions carry this request each engine step: in place would re-read the folder every time.
    assert (served.lora_int_id, served.lora_path, served.load_inplace) == (1, engine.added[1][2], False)
    assert engine.num_cache_resets == 2
    assert [p.name for p in (tmp_path / "run-a").iterdir()] == [Path(served.lora_path).name]


def test_a_refused_adapter_leaves_the_previous_one_serving(tmp_path):
    weights, engine, models, _ = loader(tmp_path)
    assert asyncio.run(weights.load_step(announcement(1))).ok
    serving = models.lora_requests["run-a"]
    engine.refuse = "LoRA rank 2 is greater than max_lora_rank"
    report = asyncio.run(weights.load_step(announcement(2)))
    assert (report.ok, report.kind) == (False, "transfer") and "greater than max_lora_rank" in report.error
    assert models.lora_requests["run-a"] == serving and engine.num_cache_resets == 1
    assert [p for p in (tmp_path / "run-a").iterdir()] == [Path(serving.lora_path)]


@pytest.mark.parametrize("error", [WeightsCorrupt("checksum mismatch on tensor x"), BusError("no bucket 0")])
def test_a_failed_transfer_writes_and_loads_nothing(tmp_path, error):
    def fetch(announced):
        raise error

    weights, engine, models, _ = loader(tmp_path, fetch)
    report = asyncio.run(weights.load_step(announcement(1)))
    assert (report.ok, report.kind, engine.added, models.lora_requests) == (False, "transfer", [], {})
    assert str(error) in report.error and not (tmp_path / "run-a").exists()


def test_hostile_metadata_is_refused_before_anything_is_fetched(tmp_path):
    weights, engine, _, fetched = loader(tmp_path)
    bad = LoraAdapterMeta(name="../x", rank=2, alpha=4.0, target_modules=["q_proj"])
    report = asyncio.run(weights.load_step(announcement(1, bad)))
    assert (report.ok, report.kind, fetched, engine.added) == (False, "transfer", [], [])
    assert "not allowed" in report.error


def test_an_adapter_step_on_a_replica_without_lora_is_refused():
    weights = EngineWeightLoader(FakeEngine(), "tcp://unused", "r", None)
    report = asyncio.run(weights.load_step(announcement(1)))
    assert (report.ok, report.kind) == (False, "transfer") and "enable_lora" in report.error


def test_the_adapter_fetched_is_the_one_announced_though_another_has_the_same_step(tmp_path):
    """The replica's real fetch path (``server.adapter_loader``: ``pull_step``) against a trainer
    serving two runs' adapters, both at step 3."""
    bus_config = BusConfig(request_timeout_s=5, linger_ms=0)
    with Bus(bus_config) as bus:
        server = WeightServer(bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", WeightStore(bucket_bytes=64)).start()
        try:
            run_b = LoraAdapterMeta(name="run-b", rank=2, alpha=4.0, target_modules=["q_proj"])
            announced = server.publish(3, adapter_tensors(1.0), META)
            server.publish(3, adapter_tensors(5.0), run_b)
            fetch = partial(pull_step, address=server.fetch_address, replica_id="r", bus_config=bus_config)
            weights, _, models, _ = loader(tmp_path, fetch)
            report = asyncio.run(weights.load_step(announced))
        finally:
            server.stop()
    assert report.ok, report.error
    saved = load_file(str(Path(models.lora_requests["run-a"].lora_path) / "adapter_model.safetensors"))
    for name, array, _ in adapter_tensors(1.0):
        assert saved[name].tobytes() == array.tobytes()
