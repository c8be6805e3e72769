"""CurveZMQ with the real service loops: only admitted keys deliver tasks, results, batches, weights, metrics.

Each test runs a real service (orchestrator, the trainer's weight server, the monitor)
with the run's keys, lets authorized peers do their normal work, and shows that an
intruder (the run's server.key but a client key nobody admitted), a peer without keys,
or an impostor server (another key set) gets nothing through. Refusals are awaited
through the bus's log lines, so nothing waits on a timer.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from rlbus.bus import Bus, BusTimeout
from rlbus.config.base import BusConfig
from rlbus.messages import BatchRequest, PolicyLoaded, RolloutResult, TaskRequest
from rlbus.pubsub import TelemetryClient
from rlbus.services.inference.worker_extension import pull_step
from rlbus.services.monitor.config import MonitorConfig, TailConfig
from rlbus.services.monitor.monitor import Monitor
from rlbus.services.monitor.service import MonitorService
from rlbus.services.monitor.tail import ViewClient, run_tail
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.weights import WeightServer, WeightStore, query_latest
from tests.curve_keys import Refusals, make_key_sets, with_keys
from tests.integration.orchestrator_peers import (
    FakeTrainer,
    FakeWorker,
    OrchestratorThread,
    PolicyClock,
    ipc_bus_config,
    remove_folder,
    short_folder,
)  # fmt: skip

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_key_sets(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def refusals() -> Iterator[Refusals]:
    watcher = Refusals()
    yield watcher
    watcher.close()


@pytest.fixture
def folder() -> Iterator[Path]:
    path = short_folder()
    yield path
    remove_folder(path)


def test_orchestrator_serves_tasks_and_batches_only_to_admitted_keys(keys, refusals, folder, tmp_path):
    bus = with_keys(ipc_bus_config(folder), keys["good"])
    config = OrchestratorConfig(batch_size=4, rollouts_per_example=2, seq_len=64, max_steps=2, output_dir=tmp_path,
                                bus=bus, train={"env": [{"id": "a"}]})  # fmt: skip
    orchestrator = OrchestratorThread(config, {"a": 20})
    orchestrator.start()
    endpoints = bus.endpoints
    with Bus(with_keys(bus, keys["intruder"])) as intruder:
        tasks = intruder.connect(zmq.DEALER, endpoints.orchestrator_tasks, "tasks")
        batches = intruder.connect(zmq.DEALER, endpoints.orchestrator_batches, "batches")
        policy = intruder.connect(zmq.DEALER, endpoints.orchestrator_policy, "policy")
        intruder.send(tasks, TaskRequest(worker_id="intruder", num_tasks=8))
        intruder.send(tasks, RolloutResult(task_id="forged", worker_id="intruder", env_id="a", example_id=0,
                                           is_eval=False, rollouts=[]))  # fmt: skip
        intruder.send(batches, BatchRequest(trainer_id="intruder", rank=0, world_size=1, step=1))
        intruder.send(policy, PolicyLoaded(replica_id="evil", base_url="http://evil", step=99, loaded_at=0.0))
        for role in ("tasks", "batches", "policy"):
            refusals.wait(on=role)

        # The admitted peers run the whole job past the intruder.
        clock = PolicyClock()
        worker = FakeWorker(bus, clock, seed=0, name="worker-0")
        trainer = FakeTrainer(bus, clock, 1, 2)
        worker.start()
        trainer.start()
        try:
            assert orchestrator.finish(TIMEOUT_S) == 0
        finally:
            worker.stop_event.set()
            worker.join(TIMEOUT_S)
            trainer.join(TIMEOUT_S)
        assert (worker.error, trainer.error) == (None, None)
        assert trainer.acked == [1, 2] and worker.answered
        # Nothing ever reached the intruder: no task, no batch, no acknowledgement.
        assert not any(sock.poll(0) for sock in (tasks, batches, policy))


@pytest.fixture
def weight_server(keys) -> Iterator[tuple[WeightServer, BusConfig]]:
    config = with_keys(BusConfig(linger_ms=0, request_timeout_s=10), keys["good"])
    bus = Bus(config)
    server = WeightServer(bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", WeightStore(bucket_bytes=4096)).start()
    weights = [("w", np.arange(3000, dtype=np.float32), "float32"), ("b", np.ones(7, dtype=np.float32), "float32")]
    server.publish(1, weights)
    yield server, config
    server.stop()
    bus.close()


def test_weights_reach_admitted_replicas_only(weight_server, keys, refusals):
    server, config = weight_server
    with Bus(config) as replica:
        sock = replica.connect(zmq.DEALER, server.fetch_address, "weights")
        announced = query_latest(replica, sock, "replica-0", timeout_s=TIMEOUT_S)
    # What the vLLM worker extension runs for each step, with the same bus settings.
    tensors = pull_step(announced, server.fetch_address, "replica-0", config)
    assert [(name, array.shape) for name, array, _ in tensors] == [("w", (3000,)), ("b", (7,))]
    for keys_dir in (keys["intruder"], None):
        with Bus(with_keys(config, keys_dir).model_copy(update={"request_timeout_s": 1.0})) as stranger:
            sock = stranger.connect(zmq.DEALER, server.fetch_address, "weights")
            with pytest.raises(BusTimeout):
                query_latest(stranger, sock, "intruder", timeout_s=1.0)
    refusals.wait(2, on="weights")
    assert server.bus.stats.auth_rejected["weights"] >= 2


def test_an_impostor_trainer_cannot_hand_weights_to_a_replica(keys, refusals):
    # The impostor binds where the trainer should be, with its own server key.
    with Bus(with_keys(BusConfig(linger_ms=0), keys["impostor"])) as impostor_bus:
        impostor = WeightServer(impostor_bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", WeightStore(4096)).start()
        impostor.publish(1, [("w", np.zeros(4, dtype=np.float32), "float32")])
        try:
            with Bus(with_keys(BusConfig(linger_ms=0), keys["good"])) as replica:
                sock = replica.connect(zmq.DEALER, impostor.fetch_address, "weights")
                with pytest.raises(BusTimeout):
                    query_latest(replica, sock, "replica-0", timeout_s=1.0)
            refusals.wait(on="weights")
            assert impostor.num_buckets_served == 0
        finally:
            impostor.stop()


class MonitorThread(threading.Thread):
    """The real monitor loop (files, live view) in a thread, stopped with :meth:`finish`."""

    def __init__(self, config: MonitorConfig) -> None:
        super().__init__(name="monitor", daemon=True)
        self.config, self.ready = config, threading.Event()
        self.monitor = Monitor(config)
        self.service: MonitorService | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Bus(self.config.bus) as bus:
                self.service = MonitorService(self.config, self.monitor, bus)
                self.ready.set()
                self.service.run()
                self.service.drain_telemetry()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()
            self.monitor.close()

    def finish(self) -> None:
        if self.service is not None:
            self.service.stop()
        self.join(TIMEOUT_S)
        assert not self.is_alive() and self.error is None, self.error


def wait_for_metric(config: TailConfig, name: str) -> float:
    """The metric as ``rlbus tail`` sees it, asking until it is there (a deadline, not a timed assertion)."""
    deadline = time.monotonic() + TIMEOUT_S
    with Bus(config.bus) as bus:
        client = ViewClient(bus, config)
        while time.monotonic() < deadline:
            snapshot = client.snapshot()
            if name in snapshot.metrics:
                return snapshot.metrics[name]
            client.sock.poll(50)  # pace the requests; nothing else arrives on this socket
    raise AssertionError(f"the live view never showed {name}")


def test_monitor_takes_metrics_and_shows_its_view_to_admitted_keys_only(keys, refusals, folder, tmp_path):
    bus = with_keys(ipc_bus_config(folder), keys["good"])
    config = MonitorConfig(output_dir=tmp_path, bus=bus, step_reporters=["trainer"], console=False)
    monitor = MonitorThread(config)
    monitor.start()
    assert monitor.ready.wait(TIMEOUT_S) and monitor.error is None
    try:
        with Bus(with_keys(bus, keys["intruder"])) as intruder:
            TelemetryClient(intruder, "trainer", "evil").metrics(1, {"loss/mean": 666.0})
            refusals.wait(on="telemetry")
            tail = TailConfig(bus=with_keys(bus, keys["intruder"]), once=True, timeout_s=1.0)
            assert run_tail(tail, io.StringIO()) == 1  # the view is closed to the intruder too
            refusals.wait(on="view")
        with Bus(with_keys(bus, keys["good"], "trainer")) as trainer:
            TelemetryClient(trainer, "trainer", "trainer-0").metrics(1, {"loss/mean": 0.5})
            tail = TailConfig(bus=with_keys(bus, keys["good"], "tail"), once=True, timeout_s=TIMEOUT_S)
            assert wait_for_metric(tail, "loss/mean") == 0.5
        assert run_tail(tail, io.StringIO()) == 0
    finally:
        monitor.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss/mean"] for row in rows if "loss/mean" in row]
    assert losses == [0.5], rows
    # The monitor files its own refusals like any metric.
    counted = [row for row in rows if row["service"] == "monitor" and "bus/auth_rejected" in row]
    assert counted and counted[-1]["bus/auth_rejected_by_socket/telemetry"] >= 1, rows
    assert counted[-1]["bus/auth_rejected_by_socket/view"] >= 1, rows
