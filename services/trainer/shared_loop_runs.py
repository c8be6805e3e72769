"""What the shared trainer (shared_loop.py) keeps per joined run: its batch channel and checkpoints.

:class:`RunChannel` is the batch protocol of ``BatchClient`` (service.py) without blocking: the
shared loop polls every run's DEALER in one ``zmq.Poller``, so a run whose orchestrator is gone only
stops its own steps; its request is resent every ``bus.request_timeout_s`` as ``BatchClient`` does.
:class:`RunCheckpoints` keeps a run's checkpoints under ``<output_dir>/runs/<run_id>/checkpoints``
(the newest two) and the token of the run that owns the folder. :func:`rank_problem` checks a
joining run's LoRA rank against the base's layers.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import torch
import zmq
from loguru import logger

from rlbus.audit import AuditLog
from rlbus.bus import Bus
from rlbus.messages import BatchAck, BatchRequest, Refused, TrainBatch
from rlbus.pubsub import TelemetryClient
from rlbus.services.trainer.multi_run import RunSpec

KEEP_CHECKPOINTS = 2
"""Checkpoints kept per run: the newest, and one more in case a kill left the newest unreadable."""
STEP_FOLDER = re.compile(r"step_(\d+)")


class RunChannel:
    """One run's DEALER to its orchestrator's batch ROUTER, its telemetry and its place in the steps."""

    def __init__(self, bus: Bus, trainer_id: str, run_id: str, token: str, batches_address: str,
                 telemetry: TelemetryClient) -> None:  # fmt: skip
        self.bus, self.trainer_id, self.run_id, self.token = bus, trainer_id, run_id, token
        self.sock = bus.connect(zmq.DEALER, batches_address, f"batches-{run_id}")
        self.telemetry = telemetry
        self.step: int | None = None
        """The step asked for and not received yet; None when the run asks for nothing (at its end)."""
        self.asked_at = self.resend_at = self.heartbeat_at = 0.0
        self.waiting_since = time.time()
        self.num_rejected = self.num_duplicates = self.num_dropped_samples = 0
        self.audit: AuditLog | None = None
        """The run's audit trail (``rlbus.audit``), when tests ask for one."""

    def ask(self, step: int) -> None:
        """Request ``step``'s batch; resent by :meth:`tick` until it comes."""
        self.step, self.waiting_since = step, time.time()
        self.asked_at = time.monotonic()
        self._send_request()

    def stop_asking(self) -> None:
        self.step = None

    def tick(self, now: float) -> float:
        """Resend the request and send a heartbeat when due; returns when the next one is due."""
        if self.step is None:
            return now + self.bus.config.heartbeat_interval_s
        if now >= self.heartbeat_at:
            self.telemetry.heartbeat("waiting", self.step - 1, f"batch of step {self.step}", self.waiting_since)
            self.heartbeat_at = now + self.bus.config.heartbeat_interval_s
        if now >= self.resend_at:
            logger.warning("run {}: waiting {:.0f}s for the batch of step {} from {}; asking again", self.run_id,
                           now - self.asked_at, self.step, self.sock.address)  # fmt: skip
            self._send_request()
        return min(self.resend_at, self.heartbeat_at)

    def receive(self) -> TrainBatch | Refused | None:
        """The next batch or refusal already queued, without waiting; None when nothing is."""
        reply = self.bus.recv_before(self.sock, time.monotonic(), (TrainBatch, Refused))
        return reply  # type: ignore[return-value]

    def ack(self, step: int, ok: bool = True, reason: str = "") -> None:
        self._send(BatchAck(trainer_id=self.trainer_id, step=step, ok=ok, reason=reason))

    def close(self) -> None:
        """Drop the DEALER at once: queued requests to a gone orchestrator are worthless."""
        self.sock.close(linger=0)
        self.telemetry.sock.close(linger=self.bus.config.linger_ms)

    def _send_request(self) -> None:
        assert self.step is not None
        self._send(BatchRequest(trainer_id=self.trainer_id, rank=0, world_size=1, step=self.step))
        self.resend_at = time.monotonic() + self.bus.config.request_timeout_s

    def _send(self, message: BatchRequest | BatchAck) -> None:
        # A DEALER whose peer is gone queues up to its HWM and then blocks: never wait on one run.
        # A lost request is resent; a lost ack makes the orchestrator resend the batch, which is
        # then acknowledged again as a duplicate.
        try:
            self.sock.send_multipart(self.bus.frames(self.sock, message, None), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.warning("run {}: {} not queued to {}: its orchestrator is not reading", self.run_id,
                           type(message).__name__, self.sock.address)  # fmt: skip


class RunCheckpoints:
    """``<output_dir>/runs/<run_id>/``: ``checkpoints/step_N`` (the newest two) and ``run_token``."""

    def __init__(self, output_dir: Path, run_id: str) -> None:
        self.run_id = run_id
        self.folder = output_dir / "runs" / run_id
        self.checkpoints = self.folder / "checkpoints"

    def step_folder(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    def steps(self) -> list[int]:
        """Complete checkpoints' steps, oldest first (``.partial`` folders are not complete)."""
        if not self.checkpoints.is_dir():
            return []
        found = (STEP_FOLDER.fullmatch(path.name) for path in self.checkpoints.iterdir() if path.is_dir())
        return sorted(int(match.group(1)) for match in found if match)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.step_folder(steps[-1]) if steps else None

    def prune(self) -> None:
        for step in self.steps()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(self.step_folder(step), ignore_errors=True)

    def owner_problem(self, token: str) -> str | None:
        """Why a run joining with ``token`` may not take this folder (another run's), or None."""
        path = self.folder / "run_token"
        if not path.is_file():
            return None
        owner = path.read_text().strip()
        if owner == token:
            return None
        return (f"run id {self.run_id!r} already names another run (another run token) with checkpoints in "
                f"{self.folder}: choose another run id, or delete that folder to start this one afresh")  # fmt: skip

    def claim(self, token: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "run_token").write_text(token + "\n")


def linear_widths(model: torch.nn.Module) -> dict[str, int]:
    """The base's linear layers (as PEFT names its targets) and the rank each can use: a LoRA
    update of a layer has rank at most min(in_features, out_features)."""
    widths: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name:  # not a joined run's adapter
            widths[name.removesuffix(".base_layer")] = min(module.in_features, module.out_features)
    return widths


def rank_problem(spec: RunSpec, widths: dict[str, int]) -> str | None:
    """Why ``spec``'s LoRA rank is too high for the layers it targets, or None. A higher rank adds
    memory, never expressiveness, and a huge one would exhaust the trainer's memory for every run."""
    targets = spec.lora.target_modules
    targeted = {n: w for n, w in widths.items() if any(n == t or n.endswith(f".{t}") for t in targets)}
    if not targeted:
        return None  # targets naming no layer are refused by RunTable.join, with the layers' names
    narrowest = min(targeted, key=targeted.__getitem__)
    if spec.lora.rank <= targeted[narrowest]:
        return None
    return (f"run {spec.run_id!r}: lora.rank {spec.lora.rank} is more than {targeted[narrowest]}, the width of "
            f"the narrowest targeted layer ({narrowest}): choose a rank of at most {targeted[narrowest]}")  # fmt: skip
