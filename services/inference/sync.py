"""The replica's bus side: learn of new steps, swap weights, tell the orchestrator and the monitor.

Sockets (all connect; the trainer, orchestrator and monitor bind):

* SUB ``trainer_announce``: ``WeightsAnnounced``; every ``Hello`` (a trainer that
  (re)appeared) also triggers a ``WeightsQuery``, as does a timer, so a missed
  announcement is caught up.
* DEALER ``trainer_weights``: ``WeightsQuery`` from here; buckets are fetched by
  the vLLM workers over their own sockets (:mod:`rlbus.services.inference.worker_extension`).
* DEALER ``orchestrator_policy``: ``PolicyLoaded`` every heartbeat until an ``Ack``
  for the served step, and again whenever a connection to an orchestrator is
  (re)established. Sends never wait: no orchestrator must never slow serving.
* PUSH ``monitor_telemetry``: heartbeats, metrics, events.

With ``await_adapter`` set, the replica follows that adapter only: it asks for its latest
step and ignores announcements of the full weights or of another adapter (another run's,
when runs share one trainer). Without it, it asks for the full weights' latest step.

Swaps run one at a time through the :class:`AdmissionGate` (see its docstring for
what happens to requests in flight). A transfer that fails verification leaves
the old weights serving; a load that fails half-way restores the base weights.
Either way the failed step is tried again after a growing wait (see
:class:`PolicyTracker`) until it loads or a newer one is published. The base
weights, whether restored or reloaded on request, count as the oldest policy:
the trainer's latest step replaces them as soon as it is known.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import zmq
from loguru import logger
from zmq.utils.monitor import parse_monitor_message

from rlbus.abus import AsyncBus, AsyncSubscriber
from rlbus.bus import BusTimeout
from rlbus.messages import Ack, Hello, Refused, WeightsAnnounced, WeightsQuery
from rlbus.pubsub import TelemetryClient
from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.gate import AdmissionGate
from rlbus.services.inference.policy import BASE_STEP, LoadReport, PolicyReporter, PolicyTracker, ServedPolicy
from rlbus.services.inference.telemetry import ThroughputMeter, read_engine_samples, weight_update_metrics
from rlbus.weights_fetch import FULL_WEIGHTS, adapter_of

IDLE_WAIT_S = 3600.0  # receive loops wake up this often even when nothing arrives


class WeightLoader(Protocol):
    async def load_step(self, announced: WeightsAnnounced) -> LoadReport: ...

    async def reload_base(self) -> LoadReport: ...

    async def abort_in_flight(self) -> None: ...

    def engine_dead(self) -> bool: ...


class ReplicaBroken(RuntimeError):
    """The weights are in an unknown state and the base weights could not be restored."""


class WeightSync:
    """Owns the replica's bus sockets and runs its weight swaps, reports and telemetry."""

    def __init__(self, config: InferenceConfig, loader: WeightLoader,
                 server_started: Callable[[], bool] = lambda: True,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:  # fmt: skip
        self.config = config
        self.loader = loader
        self.replica_id = config.resolved_replica_id()
        self.adapter = config.await_adapter or FULL_WEIGHTS
        """Whose latest step the replica asks for (``await_adapter``; "" for the full weights)."""
        self.tracker = PolicyTracker(retry_max_s=config.weights_poll_interval_s)
        self.gate = AdmissionGate()
        self.reporter = PolicyReporter(self.replica_id, config.resolved_advertise_url())
        self.server_started = server_started
        self.on_fatal = on_fatal
        self.meter = ThroughputMeter()
        self.bus = AsyncBus(config.bus)
        self._swap_lock = asyncio.Lock()
        self._pending = asyncio.Event()
        self._query_now = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, load the trainer's latest step if there is one (else serve the base), run."""
        endpoints = self.config.bus.endpoints
        # Subscribe before asking, so no announcement falls between answer and subscription.
        self.announcements = AsyncSubscriber(self.bus, endpoints.trainer_announce, "announce")
        self.weights = self.bus.connect(zmq.DEALER, endpoints.trainer_weights, "weights")
        self.policy = self._connect_immediate(endpoints.orchestrator_policy, "policy")
        self.policy_peers = self.policy.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.telemetry = TelemetryClient(self.bus, "inference", self.replica_id)
        self.telemetry.event("started", f"{self.replica_id} starting", base_url=self.reporter.base_url)
        self.telemetry.heartbeat("starting", waiting_for="latest weights from the trainer", waiting_since=time.time())
        await self._load_initial_weights()
        loops = (self._announce_loop, self._query_loop, self._update_loop, self._heartbeat_loop,
                 self._ack_loop, self._peer_loop)  # fmt: skip
        self._tasks = [asyncio.create_task(self._guarded(loop), name=loop.__name__) for loop in loops]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.telemetry.event("stopped", f"{self.replica_id} stopped")
        # A monitor socket must close before the context terminates, or term() waits forever.
        self.policy.disable_monitor()
        self.policy_peers.close(linger=0)
        self.bus.close()

    def engine_dead(self) -> bool:
        return self.loader.engine_dead()

    def _connect_immediate(self, address: str, role: str) -> zmq.Socket:
        # IMMEDIATE: queue only to a connected orchestrator, so a replica running
        # without one never piles up stale PolicyLoaded messages for it.
        sock = self.bus.open_socket(zmq.DEALER, role)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        return self.bus.connect_socket(sock, address)

    async def _guarded(self, loop: Callable) -> None:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            logger.exception("inference loop {} failed", loop.__name__)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            raise

    # ------------------------------------------------------------------ swaps

    async def _load_initial_weights(self) -> None:
        latest = await self._query_latest(self.config.startup_weights_timeout_s)
        if latest is not None and self.follows(latest) and self.tracker.offer(latest):
            await self.swap_to(self.tracker.take_pending())  # type: ignore[arg-type]
        if self.tracker.served is None and self.config.await_adapter is not None:
            # Requests name the adapter, which the base alone would answer with 404: they wait at the
            # gate (and /health says starting) until the trainer's adapter is announced and loaded.
            logger.info("waiting for the trainer's LoRA adapter {!r} before admitting requests",
                        self.config.await_adapter)  # fmt: skip
        elif self.tracker.served is None:
            logger.info("serving the base weights of {} as policy step {}", self.config.model, BASE_STEP)
            self._serve(self.tracker.loaded(BASE_STEP, 0.0, "base"), None)
            await self.gate.open(BASE_STEP)

    async def swap_to(self, announced: WeightsAnnounced) -> LoadReport:
        """Load ``announced`` with nothing in flight; on failure keep (or restore) working weights."""
        async with self._swap_lock, self.gate.swapping(self.config.swap_drain_timeout_s, self.loader.abort_in_flight):
            self.tracker.begin_swap()
            logger.info("loading weights of step {} ({:.1f} MB)", announced.step, announced.total_bytes / 1e6)
            report = await self.loader.load_step(announced)
            if report.ok:
                self._serve(self.tracker.loaded(announced.step, announced.published_at, "trainer"), report)
            else:
                self._refuse(announced, report)
                if report.kind == "load":
                    await self._restore_base()
        await self._report_policy()
        return report

    async def reload_base(self) -> LoadReport:
        """Reload the model directory's weights (the ``/rlbus/reload_weights`` control route)."""
        async with self._swap_lock, self.gate.swapping(self.config.swap_drain_timeout_s, self.loader.abort_in_flight):
            self.tracker.begin_swap()
            try:
                report = await self._restore_base()
            except ReplicaBroken as exc:
                if self.on_fatal is not None:
                    self.on_fatal(exc)
                raise
        await self._report_policy()
        # A live run needs the trainer's latest step back (the orchestrator's policy gate may
        # wait for it, and the trainer publishes nothing newer meanwhile): ask for it now.
        self._query_now.set()
        return report

    async def _restore_base(self) -> LoadReport:
        report = await self.loader.reload_base()
        if not report.ok:
            self.tracker.failed(None, report.error)
            raise ReplicaBroken(f"could not restore the base weights: {report.error}")
        # Published "at 0" like the weights a replica starts with: every trainer publication is newer.
        self._serve(self.tracker.loaded(BASE_STEP, 0.0, "base"), report)
        return report

    def _serve(self, policy: ServedPolicy, report: LoadReport | None) -> None:
        self.gate.step = policy.step  # the gate re-opens on it when the swap ends
        self.reporter.served(policy)
        fields = {"step": policy.step, "source": policy.source}
        if report is not None:
            fields |= {"seconds": round(report.seconds, 4), "mb_per_s": round(report.mb_per_s, 1)}
            self.telemetry.metrics(policy.step, weight_update_metrics(report))
            logger.info("now serving policy step {} ({:.2f}s, {:.0f} MB/s)", policy.step, report.seconds,
                        report.mb_per_s)  # fmt: skip
        self.telemetry.event("policy_loaded", f"serving policy step {policy.step}", **fields)

    def _refuse(self, announced: WeightsAnnounced, report: LoadReport) -> None:
        retry_in_s = self.tracker.failed(announced, report.error)
        kept = self.tracker.step
        logger.error("weights of step {} refused ({}); still serving step {}, trying again in {:g}s",
                     announced.step, report.error, kept, retry_in_s)  # fmt: skip
        self.telemetry.event("weights_refused", f"step {announced.step} refused: {report.error}", level="error",
                             step=announced.step, serving_step=kept, failure=report.kind,
                             retry_in_s=retry_in_s)  # fmt: skip

    # ------------------------------------------------------------------ loops

    async def _query_latest(self, timeout_s: float) -> WeightsAnnounced | None:
        try:
            reply = await self.bus.request(
                self.weights,
                WeightsQuery(replica_id=self.replica_id, adapter=self.adapter),
                (WeightsAnnounced, Refused),
                timeout_s,
                what="answer to WeightsQuery",
            )
        except BusTimeout:
            logger.info("no answer from the trainer at {} within {:g}s", self.weights.address, timeout_s)
            return None
        if isinstance(reply, Refused):
            logger.debug("the trainer has no step to offer: {}", reply.reason)
        return reply if isinstance(reply, WeightsAnnounced) else None

    def follows(self, announced: WeightsAnnounced) -> bool:
        """Whether ``announced`` is for this replica: any step without ``await_adapter`` (as before
        runs shared a trainer), else only steps of that adapter."""
        return self.config.await_adapter is None or adapter_of(announced) == self.config.await_adapter

    def _offer(self, announced: WeightsAnnounced) -> None:
        if not self.follows(announced):
            logger.debug("ignored step {} of {!r}: another run's (this replica follows adapter {!r})",
                         announced.step, adapter_of(announced) or "the full weights",
                         self.config.await_adapter)  # fmt: skip
            return
        if self.tracker.offer(announced):
            self._pending.set()

    async def _announce_loop(self) -> None:
        while True:
            try:
                message = await self.announcements.recv(IDLE_WAIT_S, (WeightsAnnounced, Hello))
            except BusTimeout:
                continue
            if isinstance(message, Hello):
                self._query_now.set()  # a trainer (re)appeared: ask what we may have missed
            else:
                self._offer(message)

    async def _query_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._query_now.wait(), self.config.weights_poll_interval_s)
            except TimeoutError:
                pass
            self._query_now.clear()
            latest = await self._query_latest(self.config.bus.request_timeout_s)
            if latest is not None:
                self._offer(latest)

    async def _update_loop(self) -> None:
        while True:
            # Wakes for an offer, or when a failed publication is due again.
            try:
                await asyncio.wait_for(self._pending.wait(), self.tracker.retry_in(time.monotonic()))
            except TimeoutError:
                pass
            self._pending.clear()
            self.tracker.retry_due(time.monotonic())
            announced = self.tracker.take_pending()
            if announced is not None:
                await self.swap_to(announced)

    async def _heartbeat_loop(self) -> None:
        while True:
            self._send_heartbeat()
            await self._report_policy()
            metrics = self.meter.update(read_engine_samples())
            metrics |= {"inference/requests_held": float(self.gate.num_waiting)}
            self.telemetry.metrics(self.tracker.step or 0, metrics)
            await asyncio.sleep(self.config.bus.heartbeat_interval_s)  # a period, not a synchronisation

    def _send_heartbeat(self) -> None:
        if self.tracker.state == "swapping":
            self.telemetry.heartbeat("busy", self.tracker.step, waiting_for="weight swap")
        elif self.tracker.ready and self.server_started():
            self.telemetry.heartbeat("ready", self.tracker.step)
        else:
            self.telemetry.heartbeat("starting", self.tracker.step, waiting_for="HTTP server start")

    async def _report_policy(self) -> None:
        message = self.reporter.due()
        if message is None:
            return
        try:
            await self.policy.send_multipart(self.bus.frames(self.policy, message, None), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # no orchestrator connected (or it is busy): the next heartbeat repeats it

    async def _ack_loop(self) -> None:
        while True:
            reply = await self.bus.recv_before(self.policy, time.monotonic() + IDLE_WAIT_S, (Ack, Refused))
            if isinstance(reply, Refused):
                # E.g. a fresh orchestrator behind the trainer: the next heartbeat reports again.
                logger.warning("orchestrator refused our policy report: {}", reply.reason)
            elif reply is not None and self.reporter.acknowledged(reply.ref):
                logger.debug("orchestrator acknowledged {}", reply.ref)

    async def _peer_loop(self) -> None:
        while True:
            event = parse_monitor_message(await self.policy_peers.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                # A new (or restarted) orchestrator: it has not heard which step we serve.
                self.reporter.peer_connected()
                await self._report_policy()
