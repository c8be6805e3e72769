"""The env-worker loop: tasks in, scored groups out, nothing lost.

One asyncio loop owns the DEALER connected to the orchestrator's task ROUTER.

- Start: no task is asked for before an inference replica answers ``/health`` with
  200; while vLLM starts (a minute or more on a CPU) every rollout would fail.
- Credit: ``TaskRequest.num_tasks`` adds to the credit the orchestrator keeps for
  this connection. On every (re)connection — the ROUTER then knows the worker
  under a new identity, with no credit — the worker offers all its free slots;
  after that, one more each time a task finishes. A task that arrives beyond
  the free slots waits in a local queue.
- Results: each finished ``RolloutResult`` is first checked against the schema
  the orchestrator decodes (``outgoing.py``: a rollout it would refuse goes out
  errored), then kept until a ``ResultAck`` names it and sent again every
  ``result_ack_timeout_s`` and on reconnection, at most ``max_result_sends``
  times in all; the orchestrator drops duplicates by ``task_id``. A refusal
  (``accepted=False``) drops the result at once: it is never sent again.
- Whatever fails while a task runs, its result (errored rollouts) is sent and
  its slot's credit given back.
- Telemetry: heartbeats every ``bus.heartbeat_interval_s`` with counters of
  tasks, rollouts, errored and empty rollouts and inference retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq
from loguru import logger
from zmq.utils.monitor import parse_monitor_message

from rlbus.abus import AsyncBus
from rlbus.audit import AuditLog
from rlbus.environments import EnvironmentCache
from rlbus.identity import service_id
from rlbus.messages import ResultAck, Rollout, RolloutResult, RolloutTask, TaskRequest
from rlbus.pubsub import TelemetryClient
from rlbus.services.env_worker.config import EnvWorkerConfig
from rlbus.services.env_worker.inference import InferenceClient
from rlbus.services.env_worker.outgoing import checked_result
from rlbus.services.env_worker.rollout import RolloutRunner, failed_rollout, num_completion_tokens
from rlbus.services.env_worker.teacher import ModeRunner, TeacherClient
from rlbus.services.env_worker.tokens import TurnRenderer

# How often the loop does its housekeeping (heartbeats, resends) while no message arrives.
TICK_S = 0.25
# How often a worker waiting for its first ready inference replica asks /health again,
# and how often it says in its log that it still waits. A refused connection costs next to nothing, and
# each poll's wait is start-up time of the whole run (the first rollouts wait for it).
INFERENCE_POLL_S = 0.2
INFERENCE_LOG_S = 30.0
# Reported to the monitor as ``env_worker/<name>``, cumulative since the worker started.
COUNTERS = ("tasks", "rollouts", "errored_rollouts", "empty_rollouts", "invalid_rollouts", "results_resent",
            "results_refused", "results_dropped", "duplicate_tasks")  # fmt: skip


@dataclass
class Unacked:
    """A sent result waiting for its ``ResultAck``."""

    result: RolloutResult
    sent_at: float
    """``time.monotonic()`` of the latest send."""
    num_sends: int = 0


class EnvWorker:
    """Takes tasks over the bus, runs them with a :class:`RolloutRunner`, returns acknowledged results."""

    def __init__(self, config: EnvWorkerConfig, runner: RolloutRunner | ModeRunner, bus: AsyncBus,
                 environments: EnvironmentCache | None = None, inference_stats: Any = None,
                 inference: InferenceClient | None = None) -> None:  # fmt: skip
        self.config, self.runner, self.bus = config, runner, bus
        self.inference = inference
        """Asked for a ready replica before the first task; None takes tasks at once."""
        self.worker_id = config.worker_id or service_id("env-worker")
        self.environments = environments or EnvironmentCache()
        self.inference_stats = inference_stats
        # Connection events say when the orchestrator (re)appears, so credit and results go out at once;
        # the monitor is attached before connecting so that the first handshake is not missed.
        self.tasks_out = bus.open_socket(zmq.DEALER, "tasks")
        self.connections = bus.watch_connections(self.tasks_out, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        bus.connect_socket(self.tasks_out, config.bus.endpoints.orchestrator_tasks)
        self.connected = False
        self.telemetry = TelemetryClient(bus, "env-worker", self.worker_id)
        self.running: dict[str, asyncio.Task[None]] = {}
        self.queued: deque[RolloutTask] = deque()
        self.unacked: dict[str, Unacked] = {}
        self.audit = AuditLog.from_env(f"env-worker-{self.worker_id}")
        """Each answer to a held result, when ``RLBUS_AUDIT_DIR`` is set (``rlbus.audit``)."""
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.policy_step = 0
        self.stopping = asyncio.Event()
        self._last_heartbeat = 0.0

    @property
    def free_slots(self) -> int:
        return max(0, self.config.max_concurrent_tasks - len(self.running) - len(self.queued))

    async def run(self) -> None:
        """Serve until :meth:`stop`; then cancel what still runs (its leases will expire)."""
        logger.info("env-worker {} taking tasks from {}", self.worker_id, self.tasks_out.address)
        self.telemetry.event("started", f"env-worker {self.worker_id} started")
        try:
            await self.wait_for_inference()
            while not self.stopping.is_set():
                # Housekeeping first: the first pass sends the credit the orchestrator waits for at
                # once, not a tick after inference became ready (start-up time of the whole run).
                await self.housekeeping()
                message = await self.bus.recv_before(
                    self.tasks_out, time.monotonic() + TICK_S, (RolloutTask, ResultAck)
                )
                if message is not None:
                    await self.handle(message)
        finally:
            for task in self.running.values():
                task.cancel()
            await asyncio.gather(*self.running.values(), return_exceptions=True)
            self.telemetry.heartbeat(status="stopping", step=self.policy_step)
            self.tasks_out.disable_monitor()

    def stop(self) -> None:
        self.stopping.set()

    async def wait_for_inference(self) -> None:
        """Return once a replica answers ``/health`` with 200 (or on :meth:`stop`).

        Until then the orchestrator gets no credit from this worker: the connection
        events wait in their socket, and the first pass of the loop sends the credit.
        """
        if self.inference is None:
            return
        urls = ", ".join(r.url for r in self.inference.replicas)
        waiting_since, started = time.time(), time.monotonic()
        log_at = started + INFERENCE_LOG_S
        while not self.stopping.is_set():
            ready = await self.inference.ready_urls()
            if ready:
                logger.info("inference ready at {} after {:.0f}s: taking tasks", ", ".join(ready),
                            time.monotonic() - started)  # fmt: skip
                return
            now = time.monotonic()
            if now - self._last_heartbeat >= self.config.bus.heartbeat_interval_s:
                self._last_heartbeat = now
                self.telemetry.heartbeat(status="waiting", step=self.policy_step, waiting_since=waiting_since,
                                         waiting_for=f"an inference replica ready at {urls}")  # fmt: skip
            if now >= log_at:
                logger.info("waited {:.0f}s for an inference replica ready at {}", now - started, urls)
                log_at = now + INFERENCE_LOG_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), INFERENCE_POLL_S)

    async def handle(self, message: RolloutTask | ResultAck) -> None:
        if isinstance(message, ResultAck):
            # Accepted or refused, the result is settled: a refused one would be refused again.
            for task_id in message.task_ids:
                pending = self.unacked.pop(task_id, None)
                if pending is not None:
                    self.record_answer(pending.result, message)
                if pending is not None and not message.accepted:
                    self.counters["results_refused"] += 1
                    # A resent result the orchestrator already has is refused as a duplicate: expected.
                    log = logger.debug if message.reason.startswith("duplicate") else logger.warning
                    log("orchestrator refused the result of task {}: {}", task_id, message.reason)
            return
        if message.task_id in self.running or any(t.task_id == message.task_id for t in self.queued):
            self.counters["duplicate_tasks"] += 1
            return
        if message.task_id in self.unacked:
            self.counters["duplicate_tasks"] += 1
            await self.send_result(self.unacked[message.task_id].result)
            return
        self.queued.append(message)
        self.start_queued()

    def record_answer(self, result: RolloutResult, ack: ResultAck) -> None:
        if self.audit is not None:
            self.audit.write({"time": time.time(), "worker_id": self.worker_id, "task_id": result.task_id,
                              "is_eval": result.is_eval, "accepted": ack.accepted, "reason": ack.reason})  # fmt: skip

    def start_queued(self) -> None:
        while self.queued and len(self.running) < self.config.max_concurrent_tasks:
            task = self.queued.popleft()
            self.running[task.task_id] = asyncio.create_task(self.run_task(task), name=f"task {task.task_id}")

    async def run_task(self, task: RolloutTask) -> None:
        try:
            result = await self.result_of(task)
            self.count(result)
            await self.send_result(result)
        finally:
            self.running.pop(task.task_id, None)
            self.start_queued()
        if self.connected and self.free_slots and not self.stopping.is_set():
            await self.request_tasks(1)

    async def result_of(self, task: RolloutTask) -> RolloutResult:
        """The result to send: errored rollouts when anything failed, never one the orchestrator refuses."""
        try:
            rollouts = await self.rollouts_of(task)
        except Exception as exc:  # noqa: BLE001 - the runner's guard failed: still answer, and free the slot
            logger.exception("task {} ({}) failed unexpectedly", task.task_id, task.env_id)
            reason = f"the rollouts failed: {type(exc).__name__}: {exc}"
            rollouts = [failed_rollout(task, i, reason) for i in range(task.num_rollouts)]
        result = RolloutResult(
            task_id=task.task_id, worker_id=self.worker_id, env_id=task.env_id, example_id=task.example_id,
            is_eval=task.is_eval, rollouts=rollouts,
        )  # fmt: skip
        result, num_invalid = checked_result(result, task.num_rollouts, self.config.bus)
        if num_invalid:
            self.counters["invalid_rollouts"] += num_invalid
            logger.warning("task {} ({}): {} rollout(s) would be refused, sent errored: {}", task.task_id,
                           task.env_id, num_invalid, next(r.error for r in result.rollouts if r.error))  # fmt: skip
        return result

    async def rollouts_of(self, task: RolloutTask) -> list[Rollout]:
        try:
            env = await self.environments.get(task.env_id, dict(task.env_args))
        except Exception as exc:  # noqa: BLE001 - an environment that cannot load fails its tasks only
            reason = f"cannot load environment {task.env_id!r}: {type(exc).__name__}: {exc}"
            return [failed_rollout(task, i, reason) for i in range(task.num_rollouts)]
        return await self.runner.run_task(task, env)

    def count(self, result: RolloutResult) -> None:
        self.counters["tasks"] += 1
        errored = [r for r in result.rollouts if r.error is not None]
        self.counters["rollouts"] += len(result.rollouts)
        self.counters["errored_rollouts"] += len(errored)
        self.counters["empty_rollouts"] += sum(
            1 for r in result.rollouts if r.error is None and num_completion_tokens(r.turns) == 0
        )
        steps = [turn.policy_step for r in result.rollouts for turn in r.turns]
        self.policy_step = max([self.policy_step, *steps])
        if errored:
            self.telemetry.event(
                "rollouts_errored", f"task {result.task_id}: {errored[0].error}", level="warning",
                env_id=result.env_id, num_errored=len(errored),
            )  # fmt: skip

    async def send_result(self, result: RolloutResult) -> None:
        """Send ``result`` and keep it until acknowledged (a failed send is retried like a lost one)."""
        pending = self.unacked.setdefault(result.task_id, Unacked(result, 0.0))
        pending.sent_at, pending.num_sends = time.monotonic(), pending.num_sends + 1
        try:
            await self.bus.send(self.tasks_out, result)
        except zmq.ZMQError as exc:
            logger.warning("could not send the result of task {} (will resend): {}", result.task_id, exc)

    async def request_tasks(self, num_tasks: int) -> None:
        await self.bus.send(self.tasks_out, TaskRequest(
            worker_id=self.worker_id, num_tasks=num_tasks, env_ids=list(self.config.env_ids),
        ))  # fmt: skip

    async def housekeeping(self) -> None:
        """Resend what may have been lost, renew credit, report health."""
        now = time.monotonic()
        if await self.reconnected():
            logger.info("connected to the orchestrator at {}; sending credit and {} unacknowledged result(s)",
                        self.tasks_out.address, len(self.unacked))  # fmt: skip
            await self.resend_results(older_than_s=0.0)
            await self.request_tasks(self.free_slots)
        elif self.connected:  # while disconnected, resends would only pile up in the socket's queue
            await self.resend_results(older_than_s=self.config.result_ack_timeout_s)
        if now - self._last_heartbeat >= self.config.bus.heartbeat_interval_s:
            self._last_heartbeat = now
            self.report()
            if self.connected:
                await self.request_tasks(0)  # keepalive: a silent worker's tasks are issued to others

    async def reconnected(self) -> bool:
        """True when a (re)connection to the orchestrator completed since the last call."""
        connected = False
        while await self.connections.poll(0):
            event = parse_monitor_message(await self.connections.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                connected = self.connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                # Not a warning: every finished run ends this way, and the worker reconnects and resends
                # by itself. An orchestrator that died is the monitor's to report (service_dead).
                logger.info("lost the connection to the orchestrator at {} (it finished, stopped or restarted); "
                            "reconnecting", self.tasks_out.address)  # fmt: skip
                self.connected = False
        return connected

    async def resend_results(self, older_than_s: float) -> None:
        now = time.monotonic()
        for pending in list(self.unacked.values()):
            task_id = pending.result.task_id
            if now - pending.sent_at < older_than_s or task_id not in self.unacked:
                continue
            if pending.num_sends >= self.config.max_result_sends:
                self.drop_result(task_id, pending)
            else:
                self.counters["results_resent"] += 1
                await self.send_result(pending.result)

    def drop_result(self, task_id: str, pending: Unacked) -> None:
        """Give up on a result nobody acknowledges (its task's lease expires and it is issued again)."""
        del self.unacked[task_id]
        self.counters["results_dropped"] += 1
        reason = f"result of task {task_id} dropped: sent {pending.num_sends} times, never acknowledged"
        logger.warning("{}", reason)
        self.telemetry.event("result_dropped", reason, level="warning", task_id=task_id)

    def report(self) -> None:
        busy = bool(self.running)
        self.telemetry.heartbeat(
            status="busy" if busy else "waiting", step=self.policy_step,
            waiting_for=None if busy else f"tasks from the orchestrator at {self.tasks_out.address}",
        )  # fmt: skip
        metrics = {f"env_worker/{name}": float(value) for name, value in self.counters.items()}
        metrics["env_worker/tasks_running"] = float(len(self.running))
        metrics["env_worker/results_unacked"] = float(len(self.unacked))
        if self.inference_stats is not None:
            metrics["env_worker/inference_retries"] = float(self.inference_stats.retries)
            metrics["env_worker/inference_failures"] = float(self.inference_stats.failures)
        self.telemetry.metrics(self.policy_step, metrics)


async def serve(config: EnvWorkerConfig) -> None:
    """Run an env-worker until SIGINT or SIGTERM."""
    client = InferenceClient.from_settings(config.inference_urls, config, model=config.request_model)
    policy_runner = RolloutRunner(client, TurnRenderer(client), config.env_timeout_s, config.model_endpoint_host)
    teacher = TeacherClient(config.teacher) if config.teacher is not None else None
    runner = ModeRunner(policy_runner, teacher)
    try:
        with AsyncBus(config.bus) as bus:
            worker = EnvWorker(config, runner, bus, inference_stats=client.stats, inference=client)
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, worker.stop)
            await worker.run()
    finally:
        await client.close()
        if teacher is not None:
            await teacher.close()
