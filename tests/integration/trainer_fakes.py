"""Small stand-ins for the trainer's peers: an orchestrator serving batches, a monitor.

Both bind real ZeroMQ sockets and run in a thread of the test process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Self

import zmq

from rlbus.bus import Bus
from rlbus.config.base import BusConfig
from rlbus.messages import BatchAck, BatchRequest, Message, MetricsReport, TrainBatch

BatchFor = Callable[[BatchRequest], list[TrainBatch]]
"""What the orchestrator answers a request with (several messages, e.g. a duplicate first)."""


class FakeOrchestrator:
    """ROUTER at ``address`` answering each BatchRequest with ``batch_for(request)``, recording acks."""

    def __init__(self, address: str, batch_for: BatchFor) -> None:
        self.address, self.batch_for = address, batch_for
        self.requests: list[BatchRequest] = []
        self.acks: list[BatchAck] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10), "fake orchestrator did not bind"
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _serve(self) -> None:
        with Bus(BusConfig(linger_ms=0)) as bus:
            router = bus.bind(zmq.ROUTER, self.address, "batches")
            self._ready.set()
            while not self._stop.is_set():
                received = bus.recv_before(router, time.monotonic() + 0.05, (BatchRequest, BatchAck))
                if received is None:
                    continue
                identity, message = received
                if isinstance(message, BatchAck):
                    self.acks.append(message)
                    continue
                self.requests.append(message)
                for batch in self.batch_for(message):
                    bus.send(router, batch, identity)


class FakeMonitor:
    """PULL at ``address`` keeping every telemetry message."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.messages: list[Message] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10), "fake monitor did not bind"
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def metrics(self) -> dict[int, dict[str, float]]:
        return {m.step: m.metrics for m in self.messages if isinstance(m, MetricsReport)}

    def wait_for_metrics(self, steps: int, timeout_s: float = 30) -> dict[int, dict[str, float]]:
        """Telemetry is asynchronous: wait (bounded) until ``steps`` reports arrived."""
        deadline = time.monotonic() + timeout_s
        while len(self.metrics()) < steps and time.monotonic() < deadline:
            self._stop.wait(0.05)
        return self.metrics()

    def _collect(self) -> None:
        with Bus(BusConfig(linger_ms=0)) as bus:
            pull = bus.bind(zmq.PULL, self.address, "telemetry")
            self._ready.set()
            while not self._stop.is_set():
                message = bus.recv_before(pull, time.monotonic() + 0.05, None)
                if message is not None:
                    self.messages.append(message)
