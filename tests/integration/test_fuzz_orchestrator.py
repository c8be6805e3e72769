"""Fuzz the orchestrator's three bound ROUTERs (tasks, batches, policy) with malformed frames.

For each socket: thousands of hostile messages (tests/integration/fuzz_frames.py)
hit the real OrchestratorService loop; every one is rejected, counted under the
socket's role and logged; then real peers (fake env-workers and a fake trainer
on their own sockets) run the steps to the end, and the orchestrator's metrics
report the rejections as ``bus/rejected_messages``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from loguru import logger

from rlbus.bus import Bus
from rlbus.messages import BatchAck, BatchRequest, Message, PolicyLoaded, RolloutResult, TaskRequest
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.service import OrchestratorService
from tests.unit.orchestrator.fakes import stub_loader

from .fuzz_frames import NUM_EXAMPLES, SocketFuzzer, decode_oracle, malformed_frames
from .orchestrator_peers import (
    FakeTrainer,
    FakeWorker,
    MonitorSink,
    OrchestratorThread,
    PolicyClock,
    ipc_bus_config,
    remove_folder,
    run_good_peers,
    short_folder,
)  # fmt: skip

pytestmark = pytest.mark.slow
SIZES = {"a": 20}
MAX_STEPS = 2
SOCKETS: dict[str, tuple[str, tuple[type[Message], ...]]] = {
    "tasks": ("orchestrator_tasks", (TaskRequest, RolloutResult)),
    "batches": ("orchestrator_batches", (BatchRequest, BatchAck)),
    "policy": ("orchestrator_policy", (PolicyLoaded,)),
}


class ServiceThread(OrchestratorThread):
    """The real orchestrator, keeping the service so the test can read its bus counters."""

    service: OrchestratorService | None = None

    def run(self) -> None:
        try:
            self.service = OrchestratorService(self.config, stub_loader(self.sizes))
            self.exit_code = self.service.run(self.stop_event)
        except BaseException as exc:  # re-raised by finish() in the test thread
            self.error = exc


@pytest.fixture
def folder() -> Iterator[Path]:
    path = short_folder()
    yield path
    remove_folder(path)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    yield lines
    logger.remove(sink)


@pytest.mark.parametrize("role", list(SOCKETS))
def test_fuzzed_socket_rejects_everything_and_the_run_still_finishes(role, folder, tmp_path, warnings):
    endpoint_name, expected = SOCKETS[role]
    config = OrchestratorConfig(
        batch_size=4, rollouts_per_example=2, seq_len=64, max_steps=MAX_STEPS, output_dir=tmp_path, task_lease_s=30,
        bus=ipc_bus_config(folder, max_frames=64), train={"env": [{"id": "a"}]},
    )  # fmt: skip
    with Bus(config.bus) as bus:
        monitor = MonitorSink(bus, config.bus.endpoints.monitor_telemetry)
        orchestrator = ServiceThread(config, SIZES)
        orchestrator.start()
        address = getattr(config.bus.endpoints, endpoint_name)
        limits = bus._limits  # the same config, so the same limits as the orchestrator's bus
        fuzzer = SocketFuzzer(zmq.DEALER, address, decode_oracle(expected, limits))
        try:
            num_sent = fuzzer.run_until_counted(
                malformed_frames(expected, config.bus.max_frames),
                lambda: rejected_on(orchestrator, role),
                f"orchestrator {role}",
            )
        finally:
            fuzzer.close()
        assert orchestrator.is_alive(), orchestrator.error

        trainer = run_good_peers(config, orchestrator, MAX_STEPS, join_timeout_s=60)
        reports = monitor.metrics()
    assert trainer.acked == list(range(1, MAX_STEPS + 1))
    assert num_sent >= NUM_EXAMPLES // 2, f"only {num_sent} of {NUM_EXAMPLES} examples reached the socket"
    assert rejected_on(orchestrator, role) == num_sent
    assert any(f"on {role} socket" in line for line in warnings)
    last = [r.metrics for r in reports if "bus/rejected_messages" in r.metrics][-1]
    assert last["bus/rejected_messages"] == last[f"bus/rejected_by_socket/{role}"] == num_sent
    reasons = dict(orchestrator.service.bus.stats.rejected_reasons)
    logger.info("fuzzed orchestrator {}: {} messages rejected, by reason {}", role, num_sent, reasons)
    assert len(reasons) >= 6, reasons  # the fuzz reached many different checks


def rejected_on(orchestrator: ServiceThread, role: str) -> int:
    service = orchestrator.service
    return service.bus.stats.decode_errors[role] if service is not None else 0


class Hammer(threading.Thread):
    """Sends random multipart garbage to one socket until stopped (plain random bytes, seeded)."""

    def __init__(self, address: str, seed: int) -> None:
        super().__init__(name=f"hammer-{seed}", daemon=True)
        self.address, self.rng = address, random.Random(seed)
        self.stop_event = threading.Event()
        self.num_sent = 0

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger, sock.sndtimeo = 0, 100  # so a stop is noticed once the orchestrator has gone
        sock.connect(self.address)
        try:
            while not self.stop_event.is_set():
                frames = [self.rng.randbytes(self.rng.randrange(200)) for _ in range(self.rng.randrange(1, 6))]
                frames[0] = b"\x93" + frames[0]  # looks like a msgpack array: gets past the first byte
                try:
                    sock.send_multipart(frames)
                except zmq.Again:  # queue full: the orchestrator is busy or finished
                    continue
                self.num_sent += 1
        finally:
            sock.close()


def test_a_run_finishes_while_every_orchestrator_socket_is_hammered(folder, tmp_path):
    max_steps = 4
    config = OrchestratorConfig(
        batch_size=4, rollouts_per_example=2, seq_len=64, max_steps=max_steps, output_dir=tmp_path, task_lease_s=30,
        bus=ipc_bus_config(folder, max_frames=64), train={"env": [{"id": "a"}]},
    )  # fmt: skip
    endpoints = config.bus.endpoints
    with Bus(config.bus) as bus:
        monitor = MonitorSink(bus, endpoints.monitor_telemetry)
        orchestrator, policy = ServiceThread(config, SIZES), PolicyClock()
        hammers = [Hammer(getattr(endpoints, name), seed) for seed, (name, _) in enumerate(SOCKETS.values())]
        workers = [FakeWorker(config.bus, policy, seed=i, max_delay_s=0.05, name=f"worker-{i}") for i in range(2)]
        trainer = FakeTrainer(config.bus, policy, 1, max_steps, seed=2, max_train_s=0.05)
        for peer in (orchestrator, *hammers, *workers, trainer):
            peer.start()
        try:
            assert orchestrator.finish() == 0
        finally:
            for peer in (*hammers, *workers):
                peer.stop_event.set()
            for peer in (*hammers, *workers, trainer):
                peer.join(60)
        monitor.metrics()
    assert trainer.error is None and all(w.error is None for w in workers), trainer.error
    assert trainer.acked == list(range(1, max_steps + 1))
    stats = orchestrator.service.bus.stats
    for hammer, role in zip(hammers, SOCKETS, strict=True):
        # Garbage still queued when the orchestrator finished is never read: counted <= sent.
        assert 0 < stats.decode_errors[role] <= hammer.num_sent, (role, stats.decode_errors, hammer.num_sent)
