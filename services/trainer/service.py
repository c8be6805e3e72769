"""``rlbus trainer``: the loop that owns the sockets around :class:`TrainStep`.

Per step N, on every rank: ask the orchestrator for this rank's share of step N
(``BatchRequest``, resent while nothing comes, each wait logged), check it (all
ranks agree on accepting or rejecting), train, publish the new weights (rank 0 serves
them; all ranks help gather), checkpoint when due, acknowledge (``BatchAck`` only once
the optimizer step is applied and, on checkpoint steps, saved), report metrics.

A rejected batch gets ``BatchAck(ok=False, reason)``; the step is used up
without an optimizer step and the trainer goes on with N + 1. A batch for a step
already trained (a resend after a lost ack) is acknowledged again and skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq
from loguru import logger

from rlbus import faults
from rlbus.audit import AuditLog
from rlbus.bus import Bus
from rlbus.messages import BatchAck, BatchRequest, LoraAdapterMeta, Refused, TrainBatch
from rlbus.pubsub import TelemetryClient
from rlbus.services.trainer.batch import BadBatch, CheckedBatch, check_batch
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.distributed import DistContext, shutdown_distributed
from rlbus.services.trainer.logprobs import RowTensors
from rlbus.services.trainer.lora import adapter_meta, base_fingerprint, is_lora, servable_arrays, weight_sizes
from rlbus.services.trainer.pulse import StepPulse
from rlbus.services.trainer.runtime import Runtime, build_runtime
from rlbus.services.trainer.weight_broadcast import WeightBroadcaster, broadcaster_for, publish_step
from rlbus.weights import PublishBuffers, WeightServer, WeightStore

# How the orchestrator names the step to train after refusing an acknowledged one.


class StepMoved(Exception):
    """The orchestrator is past the requested step; training continues at ``next_step``."""

    def __init__(self, next_step: int) -> None:
        super().__init__(f"continue at step {next_step}")
        self.next_step = next_step


class BatchClient:
    """This rank's DEALER to the orchestrator's batch ROUTER."""

    def __init__(self, bus: Bus, config: TrainerConfig, ctx: DistContext, telemetry: TelemetryClient) -> None:
        self.bus, self.ctx, self.telemetry = bus, ctx, telemetry
        self.trainer_id = config.trainer_id
        self.sock = bus.connect(zmq.DEALER, config.bus.endpoints.orchestrator_batches, "batches")
        self.num_duplicates = 0

    def fetch(self, step: int) -> TrainBatch:
        """This rank's share of ``step``; asks again every ``request_timeout_s`` until it comes."""
        ctx = self.ctx
        request = BatchRequest(trainer_id=self.trainer_id, rank=ctx.rank, world_size=ctx.world_size, step=step)
        config = self.bus.config
        waiting_since, started = time.time(), time.monotonic()
        self.bus.send(self.sock, request)
        resend_at = started + config.request_timeout_s
        while True:
            deadline = min(resend_at, time.monotonic() + config.heartbeat_interval_s)
            reply = self.bus.recv_before(self.sock, deadline, (TrainBatch, Refused))
            if reply is None:
                self.telemetry.heartbeat("waiting", step - 1, f"batch of step {step}", waiting_since)
                if time.monotonic() >= resend_at:
                    logger.warning("waiting {:.0f}s for the batch of step {} from the orchestrator at {}; asking again",
                                   time.monotonic() - started, step, self.sock.address)  # fmt: skip
                    self.bus.send(self.sock, request)
                    resend_at = time.monotonic() + config.request_timeout_s
            elif isinstance(reply, Refused):
                self._refused(step, reply)
            elif reply.step < step:
                self.num_duplicates += 1
                logger.info("batch of step {} again: already trained, acknowledged and skipped", reply.step)
                self.ack(reply.step, ok=True, reason="duplicate: already trained")
            elif reply.step > step:
                logger.warning("got the batch of step {} while expecting step {}; ignored", reply.step, step)
            else:
                return reply

    def _refused(self, step: int, refused: Refused) -> None:
        if refused.next_step is not None and refused.next_step > step:
            # The orchestrator saw steps acknowledged that this trainer's weights lack (it was
            # resumed from an older checkpoint): go on where the orchestrator is, never train twice.
            logger.error("orchestrator: {}; continuing at step {} (updates since this trainer's checkpoint are "
                         "lost: checkpoint more often to avoid this)", refused.reason, refused.next_step)  # fmt: skip
            raise StepMoved(refused.next_step)
        logger.error("orchestrator refused the batch of step {}: {}; asking again", step, refused.reason)

    def ack(self, step: int, ok: bool = True, reason: str = "") -> None:
        self.bus.send(self.sock, BatchAck(trainer_id=self.trainer_id, step=step, ok=ok, reason=reason))


class WeightPublisher:
    """Publishes every step's weights: rank 0 serves them, every rank helps gather. A LoRA run with
    ``lora.transfer = "adapter"`` publishes only the adapter's tensors, announced with its metadata."""

    def __init__(self, bus: Bus, config: TrainerConfig, ctx: DistContext) -> None:
        self.ctx = ctx
        self.config = config
        self.server: WeightServer | None = None
        self.broadcaster: WeightBroadcaster | None = None
        """``weight_transport = "collective"``: also broadcasts each step to the replicas' group (rank 0)."""
        self.buffers: PublishBuffers | None = None
        self.published_bytes = 0
        """Tensor bytes of the latest step published: what a replica fetches of it (in full)."""
        self._lora: LoraAdapterMeta | None = None
        """The adapter's metadata once a LoRA model was first published in adapter mode."""
        if ctx.is_main:
            store = WeightStore(bucket_bytes=config.weight_bucket_mb * 2**20, keep_steps=1, delta=config.weight_delta)
            endpoints = config.bus.endpoints
            self.server = WeightServer(bus, endpoints.trainer_weights, endpoints.trainer_announce, store).start()
            self.buffers = PublishBuffers(store.keep_steps + 1)
            logger.info("serving weights at {} (announcements at {})", self.server.fetch_address,
                        self.server.announce_address)  # fmt: skip
            self.broadcaster = broadcaster_for(config)

    def publish(self, step: int, model) -> float:
        """Gather and publish ``step``; returns the seconds it took."""
        started = time.perf_counter()
        if self.buffers is not None:
            self.buffers.begin_step()
        lora = self.adapter(model)
        arrays = servable_arrays(model, self.ctx, self.buffers, adapter_only=lora is not None)
        if self.server is not None:
            self.published_bytes = publish_step(self.server, self.broadcaster, step, arrays, lora).total_bytes
        else:
            for _ in arrays:  # other ranks only take part in the gathers
                pass
        return time.perf_counter() - started

    def adapter(self, model) -> LoraAdapterMeta | None:
        """The adapter's metadata when only the adapter travels, else None (merged or full weights).
        The base's fingerprint is hashed once: the base never changes."""
        lora = self.config.lora
        if lora is None or lora.transfer != "adapter" or not is_lora(model):
            return None
        if self._lora is None:
            self._lora = adapter_meta(model, lora, base_fingerprint(model) if self.ctx.is_main else "")
        return self._lora

    def wait_fetched(self, step: int, timeout_s: float) -> None:
        """Serve on until a replica fetched ``step`` (see ``final_weights_timeout_s``)."""
        if self.server is None or self.server.num_buckets_served == 0:
            return  # no replica ever fetched: none is waiting for this step either
        logger.info("waiting up to {:g}s for a replica to fetch the weights of step {}", timeout_s, step)
        if not self.server.wait_fetched(step, timeout_s):
            logger.warning("no replica fetched the weights of step {} within {:g}s", step, timeout_s)

    def stop(self) -> None:
        if self.broadcaster is not None:
            self.broadcaster.stop()
        if self.server is not None:
            self.server.stop()


class RlLoop:
    def __init__(self, config: TrainerConfig, runtime: Runtime, bus: Bus) -> None:
        self.config, self.rt = config, runtime
        ctx = runtime.ctx
        self.telemetry = TelemetryClient(bus, "trainer", f"{config.trainer_id}-rank{ctx.rank}")
        self.batches = BatchClient(bus, config, ctx, self.telemetry)
        self.weights = WeightPublisher(bus, config, ctx)
        self.pulse = StepPulse(config.bus, self.telemetry).start()
        self.num_rejected = 0
        self.audit = AuditLog.from_env(f"trainer-{config.trainer_id}") if ctx.is_main else None
        """The steps applied, for tests that check them against what env-workers were acknowledged."""
        self.num_dropped_samples = 0
        self.lora_sizes = weight_sizes(runtime.model) if is_lora(runtime.model) else {}
        """LoRA: the adapter's bytes per step against the full weights (docs/lora.md)."""

    def run(self) -> None:
        step, max_steps = self.rt.start_step + 1, self.config.max_steps
        # Replicas joining a resumed run get the resumed weights; an adapter run publishes its
        # fresh adapter (B = 0: the base's outputs) too, so replicas serve its name from the start.
        if self.rt.start_step > 0 or self.weights.adapter(self.rt.model) is not None:
            self.weights.publish(self.rt.start_step, self.rt.model)
        self.telemetry.event("started", f"trainer rank {self.rt.ctx.rank} starts at step {step}")
        while max_steps is None or step <= max_steps:
            try:
                self.train_one(step)
                step += 1
            except StepMoved as moved:
                step = moved.next_step
        self.telemetry.event("finished", f"trainer finished step {step - 1}")
        self.weights.wait_fetched(step - 1, self.config.final_weights_timeout_s)

    def train_one(self, step: int) -> None:
        started = time.perf_counter()
        batch = self.batches.fetch(step)
        waited = time.perf_counter() - started
        with self.pulse.busy(step - 1):
            try:
                rows = self.prepare(batch)
            except BadBatch as exc:
                self.record(batch, ok=False)
                self.reject(step, str(exc))
                return
            metrics = self.rt.trainer.run(step, rows, batch.num_loss_tokens, sft=batch.training_mode == "sft")
            metrics.update(self.publish_and_checkpoint(step))
            metrics.update(self.weight_bytes())
            # Acknowledged only once checkpointed (when due): a trainer killed before that resumes
            # from its previous checkpoint and gets this very batch again from the orchestrator.
            self.record(batch, ok=True)
            faults.point("trainer.before_batch_ack")
            self.batches.ack(step)
        metrics.update({"time/wait_for_batch": waited, "time/step": time.perf_counter() - started,
                        "batches/rejected": self.num_rejected, "batches/dropped_samples": self.num_dropped_samples,
                        "batches/duplicates": self.batches.num_duplicates})  # fmt: skip
        self.telemetry.heartbeat("ready", step)
        if self.rt.ctx.is_main:
            self.telemetry.metrics(step, metrics)
            log_step(step, metrics)

    def prepare(self, batch: TrainBatch) -> list[RowTensors]:
        """This rank's rows, or BadBatch on every rank if any rank's share is bad."""
        ctx = self.rt.ctx
        try:
            checked = check_batch(batch, ctx.rank, ctx.world_size, self.rt.vocab_size, self.rt.max_positions)
            error = None
        except BadBatch as exc:
            error = str(exc)
        bad_ranks = [r for r, bad in enumerate(ctx.all_gather_ints(error is not None)) if bad]
        counts = ctx.all_gather_ints(len(batch.micro_batches))
        if error is not None:
            raise BadBatch(error if ctx.world_size == 1 else f"rank {ctx.rank}: {error}")
        if bad_ranks:
            raise BadBatch(f"rank(s) {bad_ranks} rejected their share of the step")
        if len(set(counts)) > 1:
            raise BadBatch(f"ranks got different numbers of micro-batches {counts}; they must be equal")
        self._report_dropped(batch.step, checked)
        return [RowTensors.from_message(micro, ctx.device) for micro in checked.batch.micro_batches]

    def _report_dropped(self, step: int, checked: CheckedBatch) -> None:
        """Samples with bad values were turned into padding: the rest of the step trains."""
        if not checked.num_dropped_samples:
            return
        self.num_dropped_samples += checked.num_dropped_samples
        reason = "; ".join(checked.reasons)
        logger.warning("step {}: {} sample(s) with bad values dropped, the rest trains: {}", step,
                       checked.num_dropped_samples, reason)  # fmt: skip
        self.telemetry.event("bad_samples", reason, level="warning", step=step,
                             num_samples=checked.num_dropped_samples)  # fmt: skip

    def record(self, batch: TrainBatch, ok: bool) -> None:
        """Audit trail (``rlbus.audit``): the step is applied (checkpointed when due) or used up, and
        its ack not sent yet, so a kill after this leaves the step done and recorded once."""
        if self.audit is not None:
            self.audit.write({"time": time.time(), "trainer_id": self.config.trainer_id, "step": batch.step,
                              "ok": ok, "task_ids": batch.task_ids})  # fmt: skip

    def reject(self, step: int, reason: str) -> None:
        self.num_rejected += 1
        logger.error("rejected the batch of step {}: {}", step, reason)
        self.batches.ack(step, ok=False, reason=reason)
        self.telemetry.event("bad_batch", reason, level="error", step=step)

    def weight_bytes(self) -> dict[str, float]:
        """Bytes this step put on the weight channel (per replica fetch, in full), and for LoRA the
        adapter's against the full weights' (docs/lora.md): with ``transfer = "adapter"`` the
        adapter's figure is the published one, what really travelled."""
        sent = float(self.weights.published_bytes)
        metrics = {"weights/published_bytes": sent, **self.lora_sizes}
        if self.lora_sizes and self.weights.adapter(self.rt.model) is not None and sent:
            metrics["weights/lora_adapter_bytes"] = sent
            metrics["weights/lora_adapter_fraction"] = sent / self.lora_sizes["weights/full_bytes"]
        return metrics

    def publish_and_checkpoint(self, step: int) -> dict[str, float]:
        """Send the step's weights to inference and checkpoint it when due. With ``save_async`` the
        state is copied first and written while the weights go out; either way the checkpoint is
        on disk on return. ``time/save_ckpt`` is the time the step spent on it."""
        if not (self.config.ckpt.save_async and self.rt.ckpt.due(step)):
            published = self.weights.publish(step, self.rt.model)
            return {"time/broadcast_weights": published, "time/save_ckpt": self.checkpoint(step)}
        started = time.perf_counter()
        self.rt.save(step)
        staged = time.perf_counter() - started
        published = self.weights.publish(step, self.rt.model)
        return {"time/broadcast_weights": published, "time/save_ckpt": staged + self.rt.ckpt.wait()}

    def checkpoint(self, step: int) -> float:
        if not self.rt.ckpt.due(step):
            return 0.0
        started = time.perf_counter()
        self.rt.save(step)
        return time.perf_counter() - started

    def close(self) -> None:
        self.pulse.stop()
        self.weights.stop()
        self.rt.ckpt.writer.close()


def log_step(step: int, metrics: dict[str, float]) -> None:
    logger.info(
        "step {} | loss {:.4f} | entropy {:.3f} | mismatch_kl {:.2e} | lr {:.2e} | grad_norm {:.3f} | "
        "{:.0f} tok/s | mfu {:.1%} | wait {:.2f}s",
        step, metrics["loss/mean"], metrics["entropy/mean"], metrics.get("mismatch_kl/mean", 0.0),
        metrics["optim/lr"], metrics["optim/grad_norm"], metrics["perf/throughput"], metrics["perf/mfu"],
        metrics["time/wait_for_batch"],
    )  # fmt: skip


def run_trainer(config: TrainerConfig) -> int:
    """Entry of ``rlbus trainer``: train until ``max_steps`` (or forever); with
    ``max_concurrent_runs``, serve the runs that join (shared_loop.py) until stopped."""
    if config.max_concurrent_runs is not None:
        from rlbus.services.trainer.shared_loop import run_shared_trainer

        return run_shared_trainer(config)
    try:
        runtime = build_runtime(config, config.loss, config.max_steps)
        return serve(config, lambda bus: RlLoop(config, runtime, bus))
    finally:
        shutdown_distributed()


def serve(config: TrainerConfig, make_loop: Callable[[Bus], Any]) -> int:
    """Run the loop ``make_loop`` builds on a bus of ``config`` until it ends; always close it."""
    with Bus(config.bus) as bus:
        loop = make_loop(bus)
        try:
            loop.run()
        finally:
            loop.close()
    return 0
