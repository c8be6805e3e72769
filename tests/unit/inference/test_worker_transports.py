"""Weight transports of a replica's worker: relay and collective receiver start with the replica,
and a step taken from the trainer's broadcast is reported as such (``inference/weight_broadcast_mb``)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from datetime import timedelta

import msgspec
import numpy as np
import pytest
from torch.distributed import TCPStore

from rlbus.services.inference import weight_collective
from rlbus.services.inference.engine import EngineWeightLoader, merge_reports
from rlbus.services.inference.policy import LoadReport
from rlbus.services.inference.telemetry import weight_update_metrics
from rlbus.services.inference.weight_collective import ENV_VAR, Broadcast, GroupSettings
from rlbus.services.inference.worker_extension import to_torch
from rlbus.weights import WeightStore
from tests.conftest import free_tcp_port
from tests.unit.inference.test_worker_extension import SHAPES, FakeWorker, model_dir, new_weights

__all__ = ["model_dir"]


def test_the_relay_binds_and_the_receiver_starts_before_any_step(model_dir, bus_config, monkeypatch):
    relay_address = f"tcp://127.0.0.1:{free_tcp_port()}"
    # A trainer's store that names no group yet: the receiver connects and waits (and stops at once).
    store = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False)
    group = GroupSettings(address=f"127.0.0.1:{store.port}", rank=1, size=2, backend="gloo")
    monkeypatch.setattr(weight_collective, "_receiver", None)  # this process's receiver, reset afterwards
    monkeypatch.setenv(ENV_VAR, json.dumps(asdict(group)))
    worker = FakeWorker(model_dir)
    try:
        started = worker.rlbus_start_transports(bus_config.model_dump(mode="json"), {"bind": relay_address})
        assert started == {"relay": relay_address, "weight_group": group.address}
        assert worker._rlbus_relay.address == relay_address and worker.loaded == []
        assert weight_collective.process_receiver().settings == group
    finally:
        worker._rlbus_relay.stop()
        if weight_collective._receiver is not None:
            weight_collective._receiver.stop()


def test_on_the_bus_alone_nothing_starts(model_dir, bus_config, monkeypatch):
    monkeypatch.setattr(weight_collective, "_receiver", None)
    monkeypatch.delenv(ENV_VAR, raising=False)
    worker = FakeWorker(model_dir)
    assert worker.rlbus_start_transports(bus_config.model_dump(mode="json")) == {"relay": "", "weight_group": ""}
    assert worker._rlbus_relay is None


def test_a_step_taken_from_the_broadcast_is_reported_as_broadcast_bytes(model_dir, bus_config, monkeypatch):
    published = new_weights(4)
    announced = WeightStore(bucket_bytes=64).add(4, published, broadcast_group="e.0")
    released = []

    def from_the_broadcast(meta, receiver=None) -> Broadcast:
        assert meta.step == 4 and meta.broadcast_group == "e.0"
        return Broadcast(
            [(name, to_torch(array, dtype)) for name, array, dtype in published], lambda: released.append(meta.step)
        )

    monkeypatch.setattr(weight_collective, "receive_broadcast", from_the_broadcast)
    worker = FakeWorker(model_dir)
    report = LoadReport(**worker.rlbus_load_step(msgspec.to_builtins(announced), "tcp://127.0.0.1:1", "replica-t",
                                                 bus_config.model_dump(mode="json")))  # fmt: skip
    assert report.ok and released == [4]
    assert (report.broadcast_bytes, report.trainer_bytes, report.relay_bytes) == (announced.total_bytes, 0, 0)
    assert [name for name, _ in worker.loaded[-1]] == list(SHAPES)
    np.testing.assert_array_equal(worker.loaded[-1][0][1].numpy(), published[0][1])
    merged = merge_reports([report])
    assert weight_update_metrics(merged)["inference/weight_broadcast_mb"] == announced.total_bytes / 1e6
    assert weight_update_metrics(LoadReport(ok=True, step=1, trainer_bytes=5))["inference/weight_broadcast_mb"] == 0


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[dict]:
        self.calls.append((method, args))
        return [{"relay": "", "weight_group": "127.0.0.1:1"}]


@pytest.mark.parametrize(("relay", "weight_group", "called"), [
    (None, False, False), ({"bind": "tcp://127.0.0.1:1"}, False, True), (None, True, True)])  # fmt: skip
def test_the_engine_starts_the_workers_transports_only_when_there_are_any(bus_config, relay, weight_group, called):
    engine = FakeEngine()
    loader = EngineWeightLoader(engine, "tcp://127.0.0.1:1", "replica-t", bus_config, relay=relay,
                                weight_group=weight_group)  # fmt: skip
    asyncio.run(loader.start_transports())
    assert [method for method, _ in engine.calls] == (["rlbus_start_transports"] if called else [])
