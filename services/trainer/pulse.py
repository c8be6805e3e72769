"""Heartbeats while the trainer's main thread is busy with a step.

The main thread sends a heartbeat while it waits for a batch and after each
step, and nothing while it trains: forward, backward, publishing weights and
checkpointing can outlast the monitor's ``dead_after_s`` (a loaded laptop CPU,
a big model), and the monitor then reports a working trainer as DEAD, step
after step. A helper thread says "busy" every ``heartbeat_interval_s`` while a
step runs, from a socket of its own (ZeroMQ sockets are not thread-safe). A
trainer that really hangs inside a step keeps looking busy; one whose process
dies goes silent, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rlbus.bus import Bus
from rlbus.config import BusConfig
from rlbus.pubsub import TelemetryClient


class StepPulse:
    """Sends ``busy`` heartbeats on behalf of ``main`` (same service, replica, pid) inside :meth:`busy`."""

    def __init__(self, bus_config: BusConfig, main: TelemetryClient) -> None:
        self.bus_config, self.main = bus_config, main
        self.busy_step: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-pulse", daemon=True)

    def start(self) -> StepPulse:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @contextmanager
    def busy(self, step: int) -> Iterator[None]:
        """Heartbeats naming ``step`` (the last finished step) until the block ends."""
        self.busy_step = step
        try:
            yield
        finally:
            self.busy_step = None

    def _run(self) -> None:
        with Bus(self.bus_config) as bus:
            telemetry = TelemetryClient(bus, self.main.service, self.main.replica_id)
            # The main thread's identity: a different started_at would look like a restart to the monitor.
            telemetry.host, telemetry.pid, telemetry.started_at = self.main.host, self.main.pid, self.main.started_at
            while not self._stop.wait(self.bus_config.heartbeat_interval_s):
                step = self.busy_step
                if step is not None:
                    telemetry.heartbeat("busy", step)
