"""Weight fan-out through the worker extension: one replica's worker serves the step it loaded to another's."""

from __future__ import annotations

import msgspec
import torch

from rlbus.services.inference.worker_extension import RlbusWorkerExtension
from rlbus.weights import WeightServer, WeightStore
from tests.conftest import free_tcp_port
from tests.unit.inference.test_worker_extension import FakeWorker, model_dir, new_weights

__all__ = ["model_dir"]


def load(worker: RlbusWorkerExtension, server: WeightServer, announced, bus_config, relay: dict) -> dict:
    return worker.rlbus_load_step(msgspec.to_builtins(announced), server.fetch_address, "replica-t",
                                  bus_config.model_dump(mode="json"), relay)  # fmt: skip


def test_a_replica_takes_each_step_from_its_upstream_peer_and_the_trainer_uploads_it_once(model_dir, bus,
                                                                                          bus_config):  # fmt: skip
    server = WeightServer(bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", WeightStore(bucket_bytes=64)).start()
    relay_address = f"tcp://127.0.0.1:{free_tcp_port()}"
    first, second = FakeWorker(model_dir), FakeWorker(model_dir)
    try:
        for step in (1, 2):
            published = new_weights(step)
            announced = server.publish(step, published)
            assert load(first, server, announced, bus_config, {"bind": relay_address})["ok"]
            report = load(second, server, announced, bus_config,
                          {"upstream": [relay_address], "answer_timeout_s": 1.0, "wait_s": 2.0})  # fmt: skip
            assert report["ok"], report
            for (_, tensor), (_, array, _) in zip(second.loaded[-1], published, strict=True):
                assert torch.equal(tensor, torch.from_numpy(array))
            assert server.bytes_served == step * announced.total_bytes, "the trainer served the first replica only"
    finally:
        first._rlbus_relay.stop()
        server.stop()
