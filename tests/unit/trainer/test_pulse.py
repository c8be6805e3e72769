"""Heartbeats from a helper thread while a trainer step runs, as the main thread's replica."""

import zmq

from rlbus.bus import Bus
from rlbus.config.base import BusConfig, BusEndpoints
from rlbus.messages import Heartbeat
from rlbus.pubsub import TelemetryClient
from rlbus.services.trainer.pulse import StepPulse
from tests.conftest import free_tcp_port


def test_busy_step_sends_heartbeats_under_the_main_identity():
    endpoints = BusEndpoints(monitor_telemetry=f"tcp://127.0.0.1:{free_tcp_port()}")
    config = BusConfig(endpoints=endpoints, heartbeat_interval_s=0.05, linger_ms=0)
    with Bus(config) as monitor_bus, Bus(config) as trainer_bus:
        monitor = monitor_bus.bind(zmq.PULL, endpoints.monitor_telemetry, "telemetry")
        main = TelemetryClient(trainer_bus, "trainer", "trainer-rank0")
        main.started_at -= 100.0  # unlike anything the helper thread could make up itself
        pulse = StepPulse(config, main).start()
        try:
            with pulse.busy(4):
                beats = [monitor_bus.recv(monitor, 30, Heartbeat) for _ in range(3)]
        finally:
            pulse.stop()
    assert [(b.service, b.replica_id, b.status, b.step) for b in beats] == [("trainer", "trainer-rank0", "busy", 4)] * 3
    assert {(b.pid, b.host, b.started_at) for b in beats} == {(main.pid, main.host, main.started_at)}

