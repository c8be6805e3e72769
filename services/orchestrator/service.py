"""The orchestrator process: three bound ROUTERs around :class:`Orchestrator`.

- ``tasks`` (``bus.endpoints.orchestrator_tasks``): env-workers send
  ``TaskRequest`` and ``RolloutResult``, get ``RolloutTask`` and ``ResultAck``.
- ``batches`` (``orchestrator_batches``): trainer ranks send ``BatchRequest``
  and ``BatchAck``, get ``TrainBatch`` and ``Refused``.
- ``policy`` (``orchestrator_policy``): inference replicas send
  ``PolicyLoaded`` and get ``Ack``.

With ``shared_trainer`` set, a DEALER to a shared trainer's ``trainer_runs`` joins the run there
(:mod:`rlbus.services.orchestrator.trainer_join`) and leaves when every step is trained.

One thread polls all three, hands each message to the core, then sends what
the core decided. It sleeps in ``poll`` until a message, a lease expiry or
the next heartbeat, so an idle orchestrator uses no CPU.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq
from loguru import logger

from rlbus.bus import Bus, BusSocket, PeerUnreachable
from rlbus.codec import DecodeError
from rlbus.environments import load_environment
from rlbus.identity import service_id
from rlbus.messages import BatchAck, BatchRequest, Message, PolicyLoaded, RolloutResult, TaskRequest
from rlbus.pubsub import TelemetryClient
from rlbus.services.orchestrator.checkpoint import ProgressState, ProgressStore
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.core import Orchestrator, Outbox
from rlbus.services.orchestrator.journal import Journal, Replay
from rlbus.services.orchestrator.sampler import Environment
from rlbus.services.orchestrator.trainer_join import RunRefused, TrainerJoin

EnvLoader = Callable[[str, dict[str, Any]], Environment]
MAX_MESSAGES_PER_SOCKET = 256  # per poll round, so one busy channel cannot starve the others
MAX_POLL_S = 0.5  # also how quickly a stop request is noticed
EXIT_REFUSED = 2  # the shared trainer refused this run: a config error, no restart with it can help
WAIT_LOG_S = 60.0  # a wait that lasts is logged this often, naming what it waits for and since when


def environment_sizes(config: OrchestratorConfig, loader: EnvLoader) -> tuple[list[int], list[int]]:
    """Examples in each training and each eval environment (what sampling needs of them)."""
    train = [int(loader(spec.id, spec.loader_args).num_examples) for spec in config.train.env]
    evals = [int(loader(spec.id, spec.loader_args).num_examples) for spec in config.eval.env]
    for spec, size in zip([*config.train.env, *config.eval.env], [*train, *evals]):
        if size < 1:
            raise ValueError(f"environment {spec.id!r} with args {spec.args} has no examples")
    return train, evals


class OrchestratorService:
    """Owns the sockets; build and run it in the same thread (zmq sockets are not thread-safe)."""

    def __init__(self, config: OrchestratorConfig, env_loader: EnvLoader = load_environment) -> None:
        self.config = config
        train_sizes, eval_sizes = environment_sizes(config, env_loader)
        folder = config.output_dir / "checkpoints" / "orchestrator"
        progress = ProgressStore(folder, config.ckpt.keep_last)
        resume = progress.load(config.ckpt.resume_step)
        if resume is not None:
            logger.info("resuming at step {} ({} examples pending)", resume.step, len(resume.pending))
        self.journal = Journal(folder / "journal.jsonl")
        replay = self._replay(progress, resume)
        self.journal.open()
        self.core = Orchestrator(config, train_sizes, eval_sizes, progress, resume, journal=self.journal,
                                 replay=replay)  # fmt: skip
        self.bus = Bus(config.bus)
        endpoints = config.bus.endpoints
        self.tasks: BusSocket = self.bus.bind(zmq.ROUTER, endpoints.orchestrator_tasks, "tasks")
        self.batches: BusSocket = self.bus.bind(zmq.ROUTER, endpoints.orchestrator_batches, "batches")
        self.policy: BusSocket = self.bus.bind(zmq.ROUTER, endpoints.orchestrator_policy, "policy")
        replica_id = service_id("orchestrator")
        self.telemetry = TelemetryClient(self.bus, "orchestrator", replica_id)
        self.poller = zmq.Poller()
        for sock in (self.tasks, self.batches, self.policy):
            self.poller.register(sock, zmq.POLLIN)
        self.handlers: dict[BusSocket, tuple[tuple[type[Message], ...], Callable[[bytes, Any], None]]] = {
            self.tasks: ((TaskRequest, RolloutResult), self._on_tasks),
            self.batches: ((BatchRequest, BatchAck), self._on_batches),
            self.policy: ((PolicyLoaded,), self._on_policy),
        }
        self.bus.answer_rejected(self.tasks, self._on_unreadable_task_message)
        shared = config.shared_trainer
        self.trainer_join = TrainerJoin(self.bus, config, shared) if shared is not None else None
        """This run's join of a shared trainer (None: a trainer of its own pulls the batches)."""
        for sock in self.trainer_join.sockets if self.trainer_join is not None else ():
            self.poller.register(sock, zmq.POLLIN)
        self.num_bad_requests: Counter[str] = Counter()
        self._waiting: tuple[str | None, float, float] = (None, time.time(), time.monotonic())
        """(what progress waits for, since when (wall clock), when it was last logged (monotonic))."""

    def _replay(self, progress: ProgressStore, resume: ProgressState | None) -> Replay | None:
        """The journal after the resumed step when resuming from the latest progress (a restart
        after a crash); otherwise the journal belongs to another history and is moved aside."""
        steps = progress.steps()
        resume_step = self.config.ckpt.resume_step
        if resume_step == -1 or (resume is not None and steps and resume.step == steps[-1]):
            return self.journal.replay(resume.step if resume is not None else 0)
        self.journal.discard()
        return None

    def run(self, stop: threading.Event | None = None) -> int:
        """Serve until every step is trained (or ``stop`` is set); returns the exit code."""
        stop = stop or threading.Event()
        logger.info("orchestrator at step {}: tasks {}, batches {}, policy {}", self.core.step,
                    self.tasks.address, self.batches.address, self.policy.address)  # fmt: skip
        self.telemetry.event("started", f"orchestrator started at step {self.core.step}", step=self.core.step)
        next_heartbeat = time.monotonic()
        if self.trainer_join is not None:
            self.trainer_join.start(time.monotonic())
        try:
            while not self.core.done and not stop.is_set():
                ready = dict(self.poller.poll(self._poll_ms(next_heartbeat)))
                if self.trainer_join is not None:
                    self.trainer_join.handle(ready, time.monotonic())
                for sock, (expected, handle) in self.handlers.items():
                    if sock in ready:
                        self._drain(sock, expected, handle)
                self._flush(self.core.tick())
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.config.bus.heartbeat_interval_s
            if self.core.done:
                self.journal.finished([group.task_id for group in self.core.buffer])
                logger.info("all {} steps trained; orchestrator done", self.config.max_steps)
                self.telemetry.event("finished", f"all {self.config.max_steps} steps trained")
                if self.trainer_join is not None:
                    self.trainer_join.leave()
            else:
                logger.info("stopping at step {} as requested", self.core.step)
            self.telemetry.heartbeat("stopping", step=self.core.step)
        except RunRefused as exc:
            logger.error("{}; fix the run's config (shared_trainer.run_id, [trainer.lora] ...) and start again", exc)
            self.telemetry.event("refused", str(exc), "error")
            return EXIT_REFUSED
        finally:
            self.journal.close()
            self.bus.close()
        return 0

    def _poll_ms(self, next_heartbeat: float) -> int:
        now = time.monotonic()
        join_deadline = self.trainer_join.next_deadline() if self.trainer_join is not None else None
        wake = min(next_heartbeat, now + MAX_POLL_S, self.core.next_deadline() or float("inf"),
                   join_deadline or float("inf"))  # fmt: skip
        return max(0, int((wake - now) * 1000) + 1)

    def _drain(self, sock: BusSocket, expected: tuple[type[Message], ...], handle: Callable) -> None:
        for _ in range(MAX_MESSAGES_PER_SOCKET):
            received = self.bus.recv_before(sock, time.monotonic(), expected)
            if received is None:
                return
            identity, message = received
            try:
                handle(identity, message)
            except ValueError as exc:
                # Bad input from one peer is logged and counted; the service keeps going.
                self.num_bad_requests[sock.role] += 1
                logger.warning("bad {} from {!r} on {}: {}", type(message).__name__, identity, sock.role, exc)

    def _on_tasks(self, identity: bytes, message: TaskRequest | RolloutResult) -> None:
        self.core.on_worker_seen(identity)
        if isinstance(message, TaskRequest):
            self.core.on_task_request(identity, message)
        else:
            self._reply(self.tasks, identity, self.core.on_result(message))

    def _on_unreadable_task_message(self, identity: bytes | None, error: DecodeError) -> None:
        """A result that names its task but does not decode is refused with a typed ``ResultAck``, so
        the worker drops it; anything else unreadable was already counted and logged by the bus."""
        if identity is None or error.message_type != RolloutResult.__name__ or error.ref is None:
            return
        self.core.on_worker_seen(identity)
        self._reply(self.tasks, identity, self.core.on_unreadable_result(identity, error.ref, str(error)))

    def _on_batches(self, identity: bytes, message: BatchRequest | BatchAck) -> None:
        if isinstance(message, BatchRequest):
            reply = self.core.on_batch_request(identity, message)
            if reply is not None:
                self._reply(self.batches, identity, reply)
        else:
            self.core.on_batch_ack(message)

    def _on_policy(self, identity: bytes, message: PolicyLoaded) -> None:
        self._reply(self.policy, identity, self.core.on_policy_loaded(message))

    def _reply(self, sock: BusSocket, identity: bytes, message: Message) -> bool:
        try:
            self.bus.send(sock, message, identity)
        except PeerUnreachable:
            logger.warning("{} peer {!r} left before its {} was sent", sock.role, identity, type(message).__name__)
            return False
        return True

    def _flush(self, outbox: Outbox) -> None:
        gone: set[bytes] = set()
        for identity, task in outbox.tasks:
            if identity not in gone and not self._reply(self.tasks, identity, task):
                gone.add(identity)
                self.core.on_worker_gone(identity)  # its leased tasks go back to the queue
        for identity, batch in outbox.batches:
            self._reply(self.batches, identity, batch)  # a trainer that left asks again
        for step, metrics in outbox.metrics:
            self.telemetry.metrics(step, metrics)
        for samples in outbox.samples:
            self.telemetry.send(samples)
        for kind, text, level, fields in outbox.events:
            self.telemetry.event(kind, text, level, **fields)

    def _heartbeat(self) -> None:
        waiting_for = self.core.waiting_for()
        what, since, logged = self._waiting
        now = time.monotonic()
        if waiting_for != what:
            what, since, logged = waiting_for, time.time(), now
        elif waiting_for is not None and now - logged >= WAIT_LOG_S:
            logger.info("step {}: waiting {:.0f}s for {}", self.core.step, time.time() - since, waiting_for)
            logged = now
        self._waiting = (what, since, logged)
        self.telemetry.heartbeat("waiting" if waiting_for else "busy", step=self.core.step, waiting_for=waiting_for,
                                 waiting_since=since if waiting_for else None)  # fmt: skip


def run_orchestrator(config: OrchestratorConfig) -> int:
    """``rlbus orchestrator``: serve until ``max_steps`` are trained, or SIGTERM / SIGINT."""
    stop = threading.Event()

    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()  # only set a flag: logging from a signal handler can deadlock

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    return OrchestratorService(config).run(stop)
