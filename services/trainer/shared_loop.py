"""``rlbus trainer`` with ``max_concurrent_runs``: one trainer, several runs, each on its own adapter.

Run orchestrators join on the ``trainer_runs`` ROUTER (``RunJoin``: run id, token, ``RunSpec``,
their batch ROUTER and monitor). The loop then pulls each run's batches over a DEALER of its own
with the batch protocol of the single-run trainer (``BatchRequest`` -> ``TrainBatch`` ->
``BatchAck`` once the step is applied and, when due, checkpointed; duplicates acknowledged and
skipped), trains them on the run's adapter (:class:`RunTable`: batches of different runs never
share an optimizer step), publishes the run's adapter under its run id on the one weight server,
and reports the run's metrics to the run's monitor. Every socket is polled with timeouts: a run
whose orchestrator is gone stops only its own steps, and picks them up again when the
orchestrator re-joins with the same token. A run id joined with another token is refused.
Checkpoints per run (``runs/<run_id>/checkpoints/step_N``) let a restarted trainer resume each run.
"""

from __future__ import annotations

import math
import threading
import time

import torch
import zmq
from loguru import logger

from rlbus.audit import AuditLog
from rlbus.bus import Bus, PeerUnreachable
from rlbus.codec import DecodeError
from rlbus.identity import run_id_problem
from rlbus.messages import Ack, LoraAdapterMeta, Message, Refused, RunJoin, RunJoined, RunLeave, TrainBatch
from rlbus.pubsub import TelemetryClient
from rlbus.services.trainer.batch import BadBatch, check_batch
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.distributed import init_distributed, shutdown_distributed
from rlbus.services.trainer.logprobs import RowTensors
from rlbus.services.trainer.model import TORCH_DTYPES, load_model, to_numpy
from rlbus.services.trainer.multi_run import RunSpec, RunTable, StepSettings
from rlbus.services.trainer.perf import measure_peak_flops
from rlbus.services.trainer.service import serve
from rlbus.services.trainer.shared_loop_runs import RunChannel, RunCheckpoints, linear_widths, rank_problem
from rlbus.weights import WeightServer, WeightStore

SHOWN_CHARS = 80
"""Peer-chosen text (run ids, addresses) is quoted in refusals and logs up to this many characters:
a 10,000-character run id must flood neither the reply nor the log."""


class JoinRefused(Exception):
    """A ``RunJoin`` or ``RunLeave`` that cannot be served; the text is the reason sent back."""


class SharedLoop:
    """The sockets around a :class:`RunTable`: joins and leaves, each run's batches, weights."""

    def __init__(self, config: TrainerConfig, bus: Bus, table: RunTable) -> None:
        self.config, self.bus, self.table = config, bus, table
        endpoints = config.bus.endpoints
        self.router = bus.bind(zmq.ROUTER, endpoints.trainer_runs, "runs")
        bus.answer_rejected(self.router, self._answer_undecodable)
        store = WeightStore(bucket_bytes=config.weight_bucket_mb * 2**20, keep_steps=1, delta=config.weight_delta)
        self.weights = WeightServer(bus, endpoints.trainer_weights, endpoints.trainer_announce, store).start()
        self.telemetry = TelemetryClient(bus, "trainer", config.trainer_id)
        self.channels: dict[str, RunChannel] = {}
        self.adapters: dict[str, LoraAdapterMeta] = {}
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.heartbeat_at = 0.0
        self.linear_widths = linear_widths(table.model)
        config_of_model = table.model.config
        self.vocab_size = int(config_of_model.vocab_size)
        self.max_positions = int(config_of_model.max_position_embeddings)
        logger.info("shared trainer: runs join at {}, weights at {} (up to {} runs)", self.router.address,
                    self.weights.fetch_address, table.max_concurrent_runs)  # fmt: skip

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve runs until ``stop`` is set (or forever)."""
        self.telemetry.event("started", f"shared trainer for up to {self.table.max_concurrent_runs} runs")
        while stop is None or not stop.is_set():
            self.poll_once(0.5)

    def poll_once(self, timeout_s: float) -> None:
        """Handle what arrived within ``timeout_s`` (less when a resend or heartbeat is due first)."""
        now = time.monotonic()
        if now >= self.heartbeat_at:
            self.telemetry.heartbeat("ready")
            self.heartbeat_at = now + self.bus.config.heartbeat_interval_s
        wake = min([self.heartbeat_at, *(channel.tick(now) for channel in self.channels.values())])
        events = dict(self.poller.poll(math.ceil(max(0.0, min(timeout_s, wake - now)) * 1000)))
        if self.router in events:
            while (received := self.bus.recv_before(self.router, time.monotonic(), (RunJoin, RunLeave))) is not None:
                identity, message = received  # type: ignore[misc]
                self._reply(identity, self._answer(message))
        for channel in list(self.channels.values()):
            if channel.sock in events and not channel.sock.closed:
                while (reply := channel.receive()) is not None:
                    self._on_reply(channel, reply)

    # ---------------------------------------------------------------- joins and leaves

    def _answer(self, message: Message) -> Message:
        request = type(message).__name__
        try:
            return self._join(message) if isinstance(message, RunJoin) else self._leave(message)  # type: ignore[arg-type]
        except JoinRefused as exc:
            logger.error("refused {} of run {}: {}", request, shown(getattr(message, "run_id", "?")), exc)
            return Refused(request=request, reason=str(exc))

    def _join(self, join: RunJoin) -> RunJoined:
        spec = parse_spec(join)
        active = self.channels.get(join.run_id)
        if active is not None and active.token != join.token:
            step = self.table.run(join.run_id).step
            raise JoinRefused(f"run id {join.run_id!r} is already training here (at step {step}) for another "
                              "orchestrator (another run token): give this run another run id, or stop the other")  # fmt: skip
        if active is None:
            if len(self.channels) >= self.table.max_concurrent_runs:
                self._evict_idle_run(join.run_id)
            self._add_run(spec, join.token)
        elif spec != self.table.run(join.run_id).spec:
            logger.warning("run {} re-joined with another spec; it keeps the one it joined with until it leaves",
                           join.run_id)  # fmt: skip
        channel = self._open_channel(join, new_run=active is None)
        if active is not None:
            self._close_channel(active)  # its orchestrator restarted: same run, same progress
        self.channels[join.run_id] = channel
        self.poller.register(channel.sock, zmq.POLLIN)
        step = self.table.run(join.run_id).step
        self._publish(join.run_id, step)  # its replica can serve the adapter before the first step
        if spec.max_steps is None or step < spec.max_steps:
            channel.ask(step + 1)
        logger.info("run {} {} at step {}; batches from {}", join.run_id, "re-joined" if active else "joined", step,
                    join.batches_address)  # fmt: skip
        channel.telemetry.event("run_joined", f"run {join.run_id} trains on the shared trainer from step {step + 1}")
        return RunJoined(run_id=join.run_id, nonce=join.nonce, step=step)

    def _add_run(self, spec: RunSpec, token: str) -> None:
        """Join ``spec`` to the table, resumed from its newest checkpoint when it has one."""
        checkpoints = RunCheckpoints(self.config.output_dir, spec.run_id)
        problem = checkpoints.owner_problem(token)
        if problem is not None:
            raise JoinRefused(problem)
        problem = rank_problem(spec, self.linear_widths)
        if problem is not None:
            raise JoinRefused(problem)
        try:
            self.table.join(spec)
        except (ValueError, RuntimeError) as exc:
            raise JoinRefused(str(exc)) from None
        latest = checkpoints.latest()
        try:
            if latest is not None:
                self.table.load(spec.run_id, latest)
                logger.info("run {} resumed from {}", spec.run_id, latest)
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint of one run must not stop all runs
            self.table.leave(spec.run_id)
            raise JoinRefused(f"run {spec.run_id!r} cannot resume from {latest}: {exc}") from None
        checkpoints.claim(token)
        targets = self.table.model.peft_config[spec.run_id].target_modules or spec.lora.target_modules
        self.adapters[spec.run_id] = LoraAdapterMeta(
            name=spec.run_id, rank=spec.lora.rank, alpha=spec.lora.alpha, target_modules=sorted(targets),
            base_fingerprint=self.table.base_sha256,
        )  # fmt: skip

    def _leave(self, leave: RunLeave) -> Ack:
        channel = self.channels.get(leave.run_id)
        if channel is None:  # left already (a resent leave) or never joined: nothing to do
            return Ack(ref=leave.nonce)
        if channel.token != leave.token:
            raise JoinRefused(f"run {leave.run_id!r} joined with another run token: not yours to end")
        self._remove_run(channel)
        return Ack(ref=leave.nonce)

    def _remove_run(self, channel: RunChannel) -> None:
        """Checkpoint the run (with ``ckpt.enabled``), free its slot and drop its channel."""
        run = self.table.run(channel.run_id)
        if run.step > 0:
            self._checkpoint(channel.run_id, run.step, final=True)
        self._close_channel(channel)
        self.table.leave(channel.run_id)
        del self.channels[channel.run_id], self.adapters[channel.run_id]

    def _evict_idle_run(self, joining: str) -> None:
        """Free the slot of the run idle longest, if past ``run_idle_evict_s``: an orchestrator killed
        for good never sends RunLeave, and its slot would otherwise refuse every new run forever."""
        after_s, now = self.config.run_idle_evict_s, time.monotonic()
        idle = [c for c in self.channels.values() if after_s is not None and now - c.asked_at >= after_s]
        if not idle:
            return
        channel = min(idle, key=lambda c: c.asked_at)
        logger.warning("run {} gives its slot to run {}: its orchestrator sent nothing for {:.0f}s (it can "
                       "re-join later, from its checkpoint when ckpt.enabled)", channel.run_id, shown(joining),
                       now - channel.asked_at)  # fmt: skip
        channel.telemetry.event("run_evicted", f"run {channel.run_id} left the shared trainer: idle for "
                                f"{now - channel.asked_at:.0f}s while run {shown(joining)} needed its slot")  # fmt: skip
        self._remove_run(channel)

    def _open_channel(self, join: RunJoin, new_run: bool) -> RunChannel:
        """The run's batch DEALER and telemetry; a new run whose addresses do not work leaves again."""
        telemetry = None
        try:
            telemetry = TelemetryClient(self.bus, "trainer", f"{self.config.trainer_id}-{join.run_id}",
                                        join.monitor_address or None)  # fmt: skip
            channel = RunChannel(self.bus, self.config.trainer_id, join.run_id, join.token, join.batches_address,
                                 telemetry)  # fmt: skip
        except zmq.ZMQError as exc:
            if telemetry is not None:
                telemetry.sock.close(linger=0)
            if new_run:
                self.table.leave(join.run_id)
                del self.adapters[join.run_id]
            raise JoinRefused(f"run {join.run_id!r}: cannot connect to batches_address {shown(join.batches_address)} "
                              f"or monitor_address {shown(join.monitor_address)}: {str(exc)[:SHOWN_CHARS * 2]}") from None  # fmt: skip
        channel.audit = AuditLog.from_env(f"trainer-{self.config.trainer_id}-{join.run_id}")
        return channel

    def _close_channel(self, channel: RunChannel) -> None:
        self.poller.unregister(channel.sock)
        channel.close()

    # ---------------------------------------------------------------- batches

    def _on_reply(self, channel: RunChannel, reply: TrainBatch | Refused) -> None:
        run = self.table.run(channel.run_id)
        if isinstance(reply, Refused):
            self._refused(channel, reply)
        elif reply.step <= run.step:
            channel.num_duplicates += 1
            logger.info("run {}: batch of step {} again: already trained, acknowledged and skipped", channel.run_id,
                        reply.step)  # fmt: skip
            channel.ack(reply.step, ok=True, reason="duplicate: already trained")
        elif reply.step != channel.step:
            logger.warning("run {}: got the batch of step {} while expecting step {}; ignored", channel.run_id,
                           reply.step, channel.step)  # fmt: skip
        else:
            self._train(channel, reply)

    def _refused(self, channel: RunChannel, refused: Refused) -> None:
        step = channel.step
        if step is not None and refused.next_step is not None and refused.next_step > step:
            # The orchestrator saw steps acknowledged that this run's checkpoint lacks: go on where
            # the orchestrator is, never train a step twice.
            logger.error("run {}: orchestrator: {}; continuing at step {} (updates since the run's checkpoint are "
                         "lost)", channel.run_id, refused.reason, refused.next_step)  # fmt: skip
            self.table.skip_to(channel.run_id, refused.next_step - 1)
            channel.ask(refused.next_step)
            return
        logger.error("run {}: orchestrator refused the batch of step {}: {}; asking again", channel.run_id, step,
                     refused.reason)  # fmt: skip

    def _train(self, channel: RunChannel, batch: TrainBatch) -> None:
        run_id, step, started = channel.run_id, batch.step, time.perf_counter()
        waited = time.time() - channel.waiting_since
        try:
            rows = self._rows(channel, batch)
        except BadBatch as exc:
            self._reject(channel, batch, str(exc))
            return
        metrics = self.table.train(run_id, step, rows, batch.num_loss_tokens, sft=batch.training_mode == "sft")
        metrics["time/broadcast_weights"] = self._publish(run_id, step)
        metrics["time/save_ckpt"] = self._checkpoint(run_id, step)
        # Acknowledged only once applied and checkpointed (when due): a trainer killed before that
        # resumes the run from its previous checkpoint and gets this very batch again.
        self._record(channel, batch, ok=True)
        channel.ack(step)
        self._ask_next(channel, step)
        metrics.update({"time/wait_for_batch": waited, "time/step": time.perf_counter() - started,
                        "batches/rejected": channel.num_rejected, "batches/duplicates": channel.num_duplicates,
                        "batches/dropped_samples": channel.num_dropped_samples})  # fmt: skip
        channel.telemetry.heartbeat("ready", step)
        channel.telemetry.metrics(step, metrics)
        logger.info("run {} step {} | loss {:.4f} | lr {:.2e} | grad_norm {:.3f} | {:.2f}s", run_id, step,
                    metrics["loss/mean"], metrics["optim/lr"], metrics["optim/grad_norm"], metrics["time/step"])  # fmt: skip

    def _rows(self, channel: RunChannel, batch: TrainBatch) -> list[RowTensors]:
        checked = check_batch(batch, 0, 1, self.vocab_size, self.max_positions)
        if checked.num_dropped_samples:
            channel.num_dropped_samples += checked.num_dropped_samples
            reason = "; ".join(checked.reasons)
            logger.warning("run {} step {}: {} sample(s) with bad values dropped, the rest trains: {}",
                           channel.run_id, batch.step, checked.num_dropped_samples, reason)  # fmt: skip
            channel.telemetry.event("bad_samples", reason, level="warning", step=batch.step)
        device = self.table.settings.ctx.device
        return [RowTensors.from_message(micro, device) for micro in checked.batch.micro_batches]

    def _reject(self, channel: RunChannel, batch: TrainBatch, reason: str) -> None:
        """The step is used up without an optimizer step (as in the single-run trainer)."""
        channel.num_rejected += 1
        logger.error("run {}: rejected the batch of step {}: {}", channel.run_id, batch.step, reason)
        self.table.skip_to(channel.run_id, batch.step)
        self._record(channel, batch, ok=False)
        channel.ack(batch.step, ok=False, reason=reason)
        channel.telemetry.event("bad_batch", reason, level="error", step=batch.step)
        self._ask_next(channel, batch.step)

    def _ask_next(self, channel: RunChannel, step: int) -> None:
        max_steps = self.table.run(channel.run_id).spec.max_steps
        if max_steps is not None and step >= max_steps:
            channel.stop_asking()
            channel.telemetry.event("finished", f"run {channel.run_id} finished step {step}")
        else:
            channel.ask(step + 1)

    def _record(self, channel: RunChannel, batch: TrainBatch, ok: bool) -> None:
        """Audit trail (``rlbus.audit``), written before the ack as in the single-run trainer."""
        if channel.audit is not None:
            channel.audit.write({"time": time.time(), "trainer_id": self.config.trainer_id, "run_id": channel.run_id,
                                 "step": batch.step, "ok": ok, "task_ids": batch.task_ids})  # fmt: skip

    # ---------------------------------------------------------------- weights and checkpoints

    def _publish(self, run_id: str, step: int) -> float:
        """Serve the run's adapter at ``step`` under its run id; returns the seconds it took."""
        started = time.perf_counter()
        arrays = [(name, *to_numpy(tensor)) for name, tensor in self.table.adapter_tensors(run_id).items()]
        self.weights.publish(step, arrays, self.adapters[run_id])
        return time.perf_counter() - started

    def _checkpoint(self, run_id: str, step: int, final: bool = False) -> float:
        """Save the run when due (every ``ckpt.interval`` steps, at its last step, when it leaves)."""
        ckpt, max_steps = self.config.ckpt, self.table.run(run_id).spec.max_steps
        if not ckpt.enabled or not (final or step % ckpt.interval == 0 or step == max_steps):
            return 0.0
        checkpoints = RunCheckpoints(self.config.output_dir, run_id)
        if step in checkpoints.steps():
            return 0.0
        started = time.perf_counter()
        # A run's last checkpoint records the base hashed again, proving no run wrote it.
        self.table.save(run_id, checkpoints.step_folder(step), recheck_base=final or step == max_steps)
        checkpoints.prune()
        return time.perf_counter() - started

    # ---------------------------------------------------------------- replies

    def _reply(self, identity: bytes, message: Message) -> None:
        try:
            self.bus.send(self.router, message, identity)
        except PeerUnreachable as exc:
            logger.warning("reply {} not sent: {}", type(message).__name__, exc)

    def _answer_undecodable(self, identity: bytes | None, error: DecodeError) -> None:
        if identity is not None:
            self._reply(identity, Refused(request=error.message_type or "unknown", reason=str(error)[:500]))

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.weights.stop()


def parse_spec(join: RunJoin) -> RunSpec:
    """The run's validated spec, or JoinRefused saying what is wrong with it."""
    problem = run_id_problem(join.run_id)
    if problem is not None:
        raise JoinRefused(f"run id {shown(join.run_id)} cannot name an adapter and a folder: {problem}")
    if join.spec.get("run_id", join.run_id) != join.run_id:
        raise JoinRefused(f"the spec is of run {shown(join.spec['run_id'])}, the join of run {join.run_id!r}")
    try:
        return RunSpec.model_validate({**join.spec, "run_id": join.run_id})
    except ValueError as exc:
        raise JoinRefused(f"run {join.run_id!r} has a bad spec: {exc}") from None


def shown(value: object) -> str:
    """``repr(value)``, cut to ``SHOWN_CHARS`` for quoting peer-chosen text."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def run_shared_trainer(config: TrainerConfig) -> int:
    """``rlbus trainer`` with ``max_concurrent_runs``: serve runs until stopped."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    ctx = init_distributed()
    try:
        torch.manual_seed(config.seed)
        model = load_model(config.model, config.dtype, ctx.device, config.attn_implementation)
        peak_flops = config.peak_flops or measure_peak_flops(ctx.device, TORCH_DTYPES[config.dtype])
        settings = StepSettings(ctx, peak_flops, config.padded_rows(), config.memory.micro_batch_size)
        table = RunTable(model, config.max_concurrent_runs or 1, settings)
        return serve(config, lambda bus: SharedLoop(config, bus, table))
    finally:
        shutdown_distributed()
