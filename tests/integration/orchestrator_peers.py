"""Small fakes of the orchestrator's peers, each on its own real ZeroMQ sockets.

- :class:`OrchestratorThread`: the real orchestrator service in a thread.
- :class:`FakeWorker`: an env-worker that answers each task after a seeded
  random delay, with rollouts sampled by the policy inference served when
  the task arrived (completion token ids encode that policy step).
- :class:`FakeTrainer`: requests each step's batch, "trains" for a random
  while, acknowledges it, then acts as inference: loads the policy of that
  step (training step N yields policy N) and reports it with ``PolicyLoaded``.
- :func:`collect_metrics`: what the orchestrator sent to the monitor.

The random delays simulate work; nothing waits on a timer to synchronise.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from rlbus.bus import Bus
from rlbus.codec import decode
from rlbus.config.base import BusConfig, BusEndpoints, CurveConfig
from rlbus.messages import (
    Ack,
    BatchAck,
    BatchRequest,
    Event,
    MetricsReport,
    PolicyLoaded,
    Refused,
    ResultAck,
    RolloutTask,
    TaskRequest,
    TrainBatch,
)  # fmt: skip
from rlbus.ports import free_loopback_port
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.service import OrchestratorService
from tests.unit.orchestrator.fakes import roll_out, stub_loader

TIMEOUT_S = 120  # generous: a loaded 2-core machine may be slow, a hang still fails


def ipc_bus_config(folder: Path, **overrides: Any) -> BusConfig:
    """Bus settings of a test run: ipc endpoints in ``folder``, no lingering on close."""
    names = BusEndpoints.model_fields
    endpoints = BusEndpoints(**{name: f"ipc://{folder / name}" for name in names})
    values: dict[str, Any] = dict(endpoints=endpoints, linger_ms=0, heartbeat_interval_s=0.5,
                                  handshake_timeout_s=30, request_timeout_s=30)  # fmt: skip
    return BusConfig(**(values | overrides))


def tcp_bus_config(keys_dir: Path | None, **overrides: Any) -> BusConfig:
    """Bus settings of a test run over tcp on free loopback ports, with the Curve keys of
    ``keys_dir`` (client ``client``; None: plain tcp), no lingering on close."""
    names = BusEndpoints.model_fields
    endpoints = BusEndpoints(**{name: f"tcp://127.0.0.1:{free_loopback_port()}" for name in names})
    values: dict[str, Any] = {"endpoints": endpoints, "linger_ms": 0, "heartbeat_interval_s": 0.5,
                              "handshake_timeout_s": 30, "request_timeout_s": 30,
                              "curve": CurveConfig(keys_dir=keys_dir, client_name="client")}  # fmt: skip
    return BusConfig(**(values | overrides))


def short_folder() -> Path:
    # ipc paths must stay under ~100 bytes, so not under pytest's long tmp_path.
    return Path(tempfile.mkdtemp(prefix="rlbus-orch-", dir="/tmp"))


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


class PolicyClock:
    """The policy step inference serves, shared by the fake trainer and the fake workers."""

    def __init__(self) -> None:
        self.step = 0
        self.lock = threading.Lock()


class OrchestratorThread(threading.Thread):
    """The real orchestrator service, built and run in this thread (zmq sockets stay in one thread)."""

    def __init__(self, config: OrchestratorConfig, sizes: dict[str, int]) -> None:
        super().__init__(name="orchestrator", daemon=True)
        self.config, self.sizes = config, sizes
        self.stop_event = threading.Event()
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.service: OrchestratorService | None = None
        """Set once built: tests read its counters (from this thread: counts only grow)."""

    def run(self) -> None:
        try:
            self.service = OrchestratorService(self.config, stub_loader(self.sizes))
            self.exit_code = self.service.run(self.stop_event)
        except BaseException as exc:  # re-raised by finish() in the test thread
            self.error = exc

    def finish(self, timeout_s: float = TIMEOUT_S) -> int:
        self.join(timeout_s)
        if self.is_alive():
            self.stop_event.set()
            self.join(10)
            raise AssertionError(f"orchestrator did not finish within {timeout_s}s")
        if self.error is not None:
            raise self.error
        return self.exit_code  # type: ignore[return-value]


class FakeWorker(threading.Thread):
    """Answers tasks after random delays; records every task it received and answered."""

    def __init__(self, bus_config: BusConfig, policy: PolicyClock, seed: int, max_delay_s: float = 0.2,
                 slots: int = 4, name: str = "worker") -> None:  # fmt: skip
        super().__init__(name=name, daemon=True)
        self.bus_config, self.policy, self.slots = bus_config, policy, slots
        self.rng, self.max_delay_s = random.Random(seed), max_delay_s
        self.stop_event = threading.Event()
        self.received: list[str] = []
        self.answered: list[str] = []
        self.refusals: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            self.error = exc

    def _serve(self) -> None:
        with Bus(self.bus_config) as bus:
            sock = bus.connect(zmq.DEALER, self.bus_config.endpoints.orchestrator_tasks, role="tasks")
            bus.send(sock, TaskRequest(worker_id=self.name, num_tasks=self.slots))
            holding: list[tuple[float, RolloutTask, int]] = []  # (due, task, policy step at start)
            while not self.stop_event.is_set():
                wake = min([due for due, _, _ in holding], default=time.monotonic() + 0.05)
                message = bus.recv_before(sock, min(wake, time.monotonic() + 0.05), (RolloutTask, ResultAck))
                if isinstance(message, RolloutTask):
                    self.received.append(message.task_id)
                    delay = self.rng.uniform(0, self.max_delay_s)
                    holding.append((time.monotonic() + delay, message, self.policy.step))
                elif isinstance(message, ResultAck) and not message.accepted:
                    self.refusals.append(message.reason)
                now = time.monotonic()
                for item in [h for h in holding if h[0] <= now]:
                    holding.remove(item)
                    _, task, policy_step = item
                    bus.send(sock, roll_out(task, policy_step, worker_id=self.name))
                    self.answered.append(task.task_id)
                    bus.send(sock, TaskRequest(worker_id=self.name, num_tasks=1))


class FakeTrainer(threading.Thread):
    """Trains steps ``first_step .. last_step`` (inclusive) by pulling, "training", acknowledging.

    ``die_before_ack`` makes it stop after receiving that step without acknowledging it,
    like a trainer killed mid-step. ``on_batch`` sees every received ``TrainBatch``.
    ``load_last_policy``: inference serves the last step's policy too (an orchestrator with
    evaluation waits for it, to evaluate the policy the run ends with).
    """

    def __init__(self, bus_config: BusConfig, policy: PolicyClock | None, first_step: int, last_step: int,
                 seed: int = 0, max_train_s: float = 0.0, die_before_ack: int | None = None,
                 on_batch: Callable[[TrainBatch], None] | None = None, name: str = "trainer",
                 load_last_policy: bool = False) -> None:  # fmt: skip
        super().__init__(name=name, daemon=True)
        self.bus_config, self.policy = bus_config, policy
        self.steps = range(first_step, last_step + 1)
        self.rng, self.max_train_s = random.Random(seed), max_train_s
        self.die_before_ack, self.on_batch = die_before_ack, on_batch
        self.load_last_policy = load_last_policy
        self.acked: list[int] = []
        self.refused: list[tuple[int, str]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._train()
        except BaseException as exc:
            self.error = exc

    def _train(self) -> None:
        endpoints = self.bus_config.endpoints
        with Bus(self.bus_config) as bus:
            batches = bus.connect(zmq.DEALER, endpoints.orchestrator_batches, role="batches")
            policy_out = bus.connect(zmq.DEALER, endpoints.orchestrator_policy, role="policy")
            for step in self.steps:
                request = BatchRequest(trainer_id=self.name, rank=0, world_size=1, step=step)
                reply = bus.request(batches, request, (TrainBatch, Refused), timeout_s=TIMEOUT_S)
                if isinstance(reply, Refused):
                    self.refused.append((step, reply.reason))
                    continue
                assert reply.step == step, (reply.step, step)
                if self.on_batch is not None:
                    self.on_batch(reply)
                if step == self.die_before_ack:
                    return
                time.sleep(self.rng.uniform(0, self.max_train_s))  # simulated training time
                bus.send(batches, BatchAck(trainer_id=self.name, step=step))
                self.acked.append(step)
                # After the last step an orchestrator without evaluation may already be gone.
                if self.policy is not None and (step != self.steps[-1] or self.load_last_policy):
                    self._load_policy(bus, policy_out, step)

    def _load_policy(self, bus: Bus, sock: Any, step: int) -> None:
        """Inference's part: serve the new policy, then tell the orchestrator."""
        time.sleep(self.rng.uniform(0, self.max_train_s))  # simulated weight transfer
        with self.policy.lock:
            self.policy.step = step
        report = PolicyLoaded(replica_id="inference-0", base_url="http://fake", step=step, loaded_at=time.time())
        bus.request(sock, report, Ack, timeout_s=TIMEOUT_S)


class MonitorSink:
    """Binds the monitor's telemetry PULL and keeps what the orchestrator reports."""

    def __init__(self, bus: Bus, address: str) -> None:
        self.bus = bus
        self.sock = bus.bind(zmq.PULL, address, role="telemetry")

    def wait_event(self, kind: str, timeout_s: float = TIMEOUT_S) -> Event:
        """The first ``Event`` of ``kind`` from the orchestrator (other messages are dropped)."""
        deadline = time.monotonic() + timeout_s
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            message = decode(self.sock.recv_multipart())
            if isinstance(message, Event) and message.service == "orchestrator" and message.kind == kind:
                return message
        raise TimeoutError(f"no {kind!r} event from the orchestrator within {timeout_s}s")

    def metrics(self) -> list[MetricsReport]:
        """Every ``MetricsReport`` received so far (call after the orchestrator stopped)."""
        reports = []
        while self.sock.poll(200):
            message = decode(self.sock.recv_multipart())
            if isinstance(message, MetricsReport) and message.service == "orchestrator":
                reports.append(message)
        return reports


def run_good_peers(config: OrchestratorConfig, orchestrator: OrchestratorThread, max_steps: int,
                   join_timeout_s: float, on_batch: Callable[[TrainBatch], None] | None = None) -> FakeTrainer:
    """A well-behaved env-worker and trainer finish ``orchestrator``'s run after a test has
    attacked it; returns the trainer (its ``acked`` steps tell what was trained)."""
    policy = PolicyClock()
    worker = FakeWorker(config.bus, policy, seed=1, max_delay_s=0.01)
    trainer = FakeTrainer(config.bus, policy, 1, max_steps, seed=2, on_batch=on_batch)
    for peer in (worker, trainer):
        peer.start()
    try:
        assert orchestrator.finish() == 0
    finally:
        worker.stop_event.set()
        for peer in (worker, trainer):
            peer.join(join_timeout_s)
    assert worker.error is None and trainer.error is None, (worker.error, trainer.error)
    return trainer
