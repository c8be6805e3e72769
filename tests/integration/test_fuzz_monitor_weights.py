"""Fuzz the monitor's sockets (telemetry PULL, live-view ROUTER) and the trainer's weight
server (weights ROUTER, announce XPUB) with malformed frames, then use them for real.

Each runs the real loop in a thread: ``MonitorService`` around a real ``Monitor``
writing its files, and the ``WeightServer`` the trainer's rank 0 runs. After
thousands of hostile messages per socket, each rejected, counted and logged, a
well-formed peer still gets what it came for: metrics recorded and shown in the
live view; weights fetched with matching checksums and new steps announced.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from rlbus.bus import Bus
from rlbus.config.base import BusConfig, BusEndpoints
from rlbus.messages import (
    Event,
    Heartbeat,
    MetricsReport,
    RolloutSamples,
    ViewRequest,
    ViewSnapshot,
    WeightsAnnounced,
    WeightsFetch,
    WeightsQuery,
)  # fmt: skip
from rlbus.pubsub import Subscriber, TelemetryClient
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.monitor.monitor import Monitor
from rlbus.services.monitor.service import MonitorService
from rlbus.weights import WeightServer, WeightStore, fetch_step, query_latest

from .fuzz_frames import (
    NUM_EXAMPLES,
    SocketFuzzer,
    decode_oracle,
    malformed_frames,
    not_subscriptions,
    subscription_oracle,
)  # fmt: skip
from .orchestrator_peers import ipc_bus_config, remove_folder, short_folder

pytestmark = pytest.mark.slow
TIMEOUT_S = 60.0
TELEMETRY = (Heartbeat, MetricsReport, Event, RolloutSamples)


@pytest.fixture
def bus_config() -> Iterator[BusConfig]:
    folder = short_folder()
    yield ipc_bus_config(folder, max_frames=64)
    remove_folder(folder)


class MonitorThread(threading.Thread):
    def __init__(self, config: MonitorConfig) -> None:
        super().__init__(name="monitor", daemon=True)
        self.bus = Bus(config.bus)
        self.monitor = Monitor(config)
        self.service = MonitorService(config, self.monitor, self.bus)  # binds here, runs in the thread
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.service.run()
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.service.stop()
        self.join(TIMEOUT_S)
        self.service.report_bus_metrics()  # as run_monitor does on the way out
        self.monitor.close()
        self.bus.close()
        assert not self.is_alive() and self.error is None, self.error


def fuzz(bus: Bus, socket_type: int, address: str, expected: tuple, max_frames: int, role: str, what: str) -> int:
    """Fuzz one socket until ``bus`` has counted every rejection under ``role``."""
    fuzzer = SocketFuzzer(socket_type, address, decode_oracle(expected, bus._limits))
    try:
        return fuzzer.run_until_counted(
            malformed_frames(expected, max_frames), lambda: bus.stats.decode_errors[role], what
        )
    finally:
        fuzzer.close()


@pytest.mark.parametrize("role", ["telemetry", "view"])
def test_fuzzed_monitor_socket_rejects_everything_and_still_records(role, bus_config, tmp_path):
    config = MonitorConfig(output_dir=tmp_path, bus=bus_config)
    monitor = MonitorThread(config)
    monitor.start()
    try:
        socket_type, address, expected = {
            "telemetry": (zmq.PUSH, monitor.service.telemetry_in.address, TELEMETRY),
            "view": (zmq.DEALER, monitor.service.view_requests.address, (ViewRequest,)),
        }[role]
        num_sent = fuzz(monitor.bus, socket_type, address, expected, bus_config.max_frames, role, f"monitor {role}")
        assert monitor.is_alive(), monitor.error

        with Bus(bus_config) as bus:
            TelemetryClient(bus, "trainer", "trainer-0").metrics(1, {"loss/mean": 0.5})
            TelemetryClient(bus, "orchestrator", "orchestrator-0").metrics(1, {"reward/all/mean": 0.25})
            view = bus.connect(zmq.DEALER, address if role == "view" else monitor.service.view_requests.address)
            snapshot = None
            for _ in range(600):  # ask until step 1 is complete (each answer is a round trip, no sleeping)
                snapshot = bus.request(view, ViewRequest(), ViewSnapshot, timeout_s=TIMEOUT_S)
                if snapshot.step == 1:
                    break
            assert snapshot is not None and snapshot.metrics == {"loss/mean": 0.5, "reward/all/mean": 0.25}
    finally:
        monitor.finish()
    assert num_sent >= NUM_EXAMPLES // 2
    assert monitor.bus.stats.decode_errors[role] == num_sent
    # The monitor files its own rejections like any service's metrics (metrics.jsonl).
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    own = [line for line in lines if line["service"] == "monitor"]
    assert own and own[-1][f"bus/rejected_by_socket/{role}"] == num_sent


@pytest.fixture
def weight_server(bus_config) -> Iterator[tuple[Bus, WeightServer]]:
    bus = Bus(bus_config)
    store = WeightStore(bucket_bytes=4096)
    server = WeightServer(bus, bus_config.endpoints.trainer_weights, bus_config.endpoints.trainer_announce, store)
    server.start()
    yield bus, server
    server.stop()
    bus.close()


def tensors(step: int) -> list[tuple[str, np.ndarray, str]]:
    rng = np.random.default_rng(step)
    return [(f"layer{i}.weight", rng.standard_normal((32, 16), dtype=np.float32), "float32") for i in range(4)]


def test_fuzzed_weights_router_rejects_everything_and_still_serves(weight_server, bus_config):
    bus, server = weight_server
    server.publish(1, tensors(1))
    expected = (WeightsQuery, WeightsFetch)
    num_sent = fuzz(
        bus, zmq.DEALER, server.fetch_address, expected, bus_config.max_frames, "weights", "trainer weights"
    )
    assert server._thread.is_alive()
    with Bus(bus_config) as client:
        sock = client.connect(zmq.DEALER, server.fetch_address, "weights-client")
        announced = query_latest(client, sock, "replica-0", TIMEOUT_S)
        assert announced is not None and announced.step == 1
        fetched = fetch_step(client, sock, announced, "replica-0", TIMEOUT_S)  # CRC32 checked per tensor
    for (name, got, _), (_, sent, _) in zip(fetched, tensors(1), strict=True):
        np.testing.assert_array_equal(got, sent, err_msg=name)
    assert num_sent >= NUM_EXAMPLES // 2 and bus.stats.decode_errors["weights"] == num_sent


def test_fuzzed_announce_xpub_rejects_everything_and_still_announces(weight_server, bus_config):
    bus, server = weight_server
    fuzzer = SocketFuzzer(zmq.XSUB, server.announce_address, subscription_oracle)
    try:
        num_sent = fuzzer.run_until_counted(
            not_subscriptions(), lambda: bus.stats.decode_errors["announce"], "trainer announce"
        )
    finally:
        fuzzer.close()
    with Bus(bus_config) as client:
        subscriber = Subscriber(client, server.announce_address)
        subscriber.wait_ready(TIMEOUT_S)
        server.publish(2, tensors(2))
        announced = subscriber.recv(TIMEOUT_S, WeightsAnnounced)
    assert announced.step == 2 and announced.num_buckets >= 1
    assert num_sent >= NUM_EXAMPLES // 2 and bus.stats.rejected_reasons["not_a_subscription"] == num_sent


def test_every_bound_endpoint_is_fuzzed():
    """A new bound endpoint must get a fuzz test: this list names the tested ones."""
    fuzzed = {"orchestrator_tasks", "orchestrator_batches", "orchestrator_policy", "trainer_weights",
              "trainer_announce", "trainer_runs", "monitor_telemetry", "monitor_view"}  # fmt: skip
    assert set(BusEndpoints.model_fields) == fuzzed
