"""The orchestrator's trainer-facing side: built steps until the trainer acknowledges them.

:class:`BatchDelivery` owns the step counter (the next step to build), the built batches
(:class:`~rlbus.services.orchestrator.batches.BatchStore`), the progress snapshot of each built step
and the task ids it was built from. It answers ``BatchRequest`` and ``BatchAck``, follows a
trainer that resumed elsewhere (rewind, fast-forward) and saves progress once a checkpointed
step is acknowledged. The core builds steps and hands them over with :meth:`BatchDelivery.add`.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from loguru import logger

from rlbus import faults
from rlbus.messages import BatchAck, BatchRequest, Refused, TrainBatch
from rlbus.services.orchestrator.batches import BatchStore
from rlbus.services.orchestrator.checkpoint import ProgressState, ProgressStore
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.journal import Journal
from rlbus.services.orchestrator.step_metrics import StepMetrics

EmitEvent = Callable[..., None]
"""``emit(kind, message, level="info", **fields)``: an event for the monitor."""


class BatchDelivery:
    """Batches of built steps, delivered exactly once to the trainer's ranks."""

    def __init__(self, config: OrchestratorConfig, resumed_step: int, step_metrics: StepMetrics, emit: EmitEvent,
                 progress: ProgressStore | None, journal: Journal | None) -> None:  # fmt: skip
        self.config = config
        self.max_steps = config.max_steps
        self.resumed_step = resumed_step
        """Progress is saved only once its step is acknowledged: steps up to here were trained before."""
        self.next_step = resumed_step + 1
        """Next batch step to build."""
        self.step_metrics = step_metrics
        self.emit = emit
        self.progress = progress
        self.journal = journal
        # Only acknowledgements seen by this process count: after a restart the trainer may
        # legitimately resume from an older checkpoint than ours (see _rewind).
        self.store = BatchStore(acked_below=1)
        self.snapshots: dict[int, ProgressState] = {}
        self.step_tasks: dict[int, list[str]] = {}
        """Task ids of each built step not acknowledged yet (journaled again when renumbered)."""

    # ---------------------------------------------------------------- built steps

    def record_tasks(self, step: int, task_ids: list[str], journaled: bool = True) -> None:
        """``step`` is built from the groups of ``task_ids`` (journaled unless replayed from the journal)."""
        self.step_tasks[step] = task_ids
        if journaled and self.journal is not None:
            self.journal.built(step, task_ids)

    def add(self, step: int, batches: list[TrainBatch], snapshot: ProgressState) -> list[tuple[bytes, TrainBatch]]:
        """Hold the built ``step`` until acknowledged; the batches ranks already wait for, to send now."""
        self.next_step = step + 1
        self.snapshots[step] = snapshot
        return self.store.add(step, batches)

    def attach_journal(self, journal: Journal | None) -> None:
        """Record to ``journal`` from now on (None: record nothing)."""
        self.journal = journal

    def move_to(self, step: int) -> None:
        """Make ``step`` the next step to build, as if the steps before it had been built."""
        self.next_step = step

    def acknowledge_resumed(self) -> None:
        """When every step was trained before the restart, no trainer will ask again: its requests
        are answered as such."""
        if self.max_steps is not None and self.resumed_step >= self.max_steps:
            self.store.ack_below(self.resumed_step + 1)

    @property
    def num_unacked_groups(self) -> int:
        return sum(map(len, self.step_tasks.values()))

    @property
    def all_trained(self) -> bool:
        # Steps up to the resumed progress count as trained here (only for finishing: a trainer that
        # resumes from an older checkpoint still gets them again, see _rewind). Otherwise an
        # orchestrator restarted near the end waits forever for a trainer that has finished.
        return self.max_steps is not None and self.store.first_unacked(self.resumed_step + 1) > self.max_steps

    # --------------------------------------------------------------- trainer

    def on_batch_request(self, identity: bytes, request: BatchRequest) -> TrainBatch | Refused | None:
        """The rank's batch, a refusal, or None when the step is not built yet (answered later)."""
        problem = self._request_problem(request)
        if problem is not None:
            return Refused(request="BatchRequest", reason=problem)
        self._acknowledge_below(request.step)
        if self.store.is_acked(request.step) and self.store.replay(request.step):
            logger.warning("trainer asks for step {} again (restarted from its checkpoint): steps {}..{} are "
                           "trained again with the same batches", request.step, request.step,
                           self.store.acked_below + self.store.num_held - 1)  # fmt: skip
            self.emit("replay", f"trainer restarted at step {request.step}: acknowledged steps replayed",
                      "warning", step=request.step)  # fmt: skip
        if self.store.is_acked(request.step):
            return Refused(
                request="BatchRequest",
                next_step=self.store.acked_below,
                reason=(
                    f"step {request.step} is already trained (acknowledged); the next step is {self.store.acked_below}"
                ),
            )
        if request.step < self.next_step and not self.store.holds(request.step):
            self._rewind(request.step)
        batch = self.store.get(request.step, request.rank)
        if batch is not None:
            return batch
        self._fast_forward(request.step)
        self.store.wait(identity, request.rank, request.step)
        return None

    def on_batch_ack(self, ack: BatchAck) -> None:
        """Forget the step's batches. Not answered: a lost ack is made up for by the next
        ``BatchRequest``, which acknowledges every earlier step."""
        if ack.step < 1 or (self.max_steps is not None and ack.step > self.max_steps):
            raise ValueError(f"BatchAck from {ack.trainer_id!r} for step {ack.step}, outside 1..{self.max_steps}")
        if ack.step >= self.next_step:
            # Only a BatchRequest moves this orchestrator ahead to a trainer's step: an ack of a step
            # never built here proves nothing about the steps before it.
            raise ValueError(f"BatchAck from {ack.trainer_id!r} for step {ack.step}, which was never built "
                             f"(next step to build: {self.next_step})")  # fmt: skip
        if not ack.ok:
            self.step_metrics.drop("rejected_batches")
            self.emit("batch_rejected", f"trainer rejected step {ack.step}: {ack.reason}", "warning", step=ack.step)
        if self.store.ack(ack.step):
            self._on_acknowledged(ack.step)

    def _request_problem(self, request: BatchRequest) -> str | None:
        world_size = self.config.trainer_world_size
        if request.world_size != world_size:
            return f"world_size {request.world_size}, but batches are packed for trainer_world_size={world_size}"
        if not 0 <= request.rank < world_size:
            return f"rank {request.rank} is outside 0..{world_size - 1}"
        if request.step < 1:
            return f"step {request.step}: steps count from 1"
        if self.max_steps is not None and request.step > self.max_steps:
            return f"step {request.step} is past the end of the run (max_steps={self.max_steps})"
        return None

    def _acknowledge_below(self, step: int) -> None:
        for released in self.store.ack_below(step):
            self._on_acknowledged(released)

    def _rewind(self, step: int) -> None:
        """The trainer asks for ``step``, below what this orchestrator built since it resumed: the
        trainer resumed from an older checkpoint, so those steps are not in its weights. Continue at
        its step; batches held for later steps are renumbered from it, none of their rollouts is lost."""
        logger.warning("trainer is at step {}, this orchestrator at {}: continuing at the trainer's step",
                       step, self.next_step)  # fmt: skip
        self.emit("rewind", f"went back from step {self.next_step} to the trainer's step {step}", "warning")
        moves = self.store.renumber(step)
        self.snapshots = {new: msgspec.structs.replace(self.snapshots[old], step=new)
                          for old, new in moves if old in self.snapshots}  # fmt: skip
        self.step_tasks = {new: self.step_tasks.get(old, []) for old, new in moves}
        if self.journal is not None:
            for new_step, task_ids in self.step_tasks.items():
                self.journal.built(new_step, task_ids)
        self.next_step = step + len(moves)

    def _fast_forward(self, step: int) -> None:
        """The trainer is at ``step``, beyond what this orchestrator built (it restarted from an
        older checkpoint, or fresh): skip ahead, since those steps are trained already."""
        if step > self.next_step:
            logger.warning("trainer is at step {}, this orchestrator at {}: skipping ahead", step, self.next_step)
            self.emit("fast_forward", f"skipped from step {self.next_step} to the trainer's step {step}", "warning")
            self.next_step = step

    def _on_acknowledged(self, step: int) -> None:
        self.step_tasks.pop(step, None)
        if self.journal is not None:
            self.journal.acked(step)
        snapshot = self.snapshots.pop(step, None)
        for old in [s for s in self.snapshots if s < step]:
            del self.snapshots[old]
        if snapshot is None or self.progress is None:
            self.store.forget_up_to(step)
            return
        if step % self.config.ckpt.interval == 0 or step == self.max_steps:
            self.store.forget_up_to(step)
            if self.journal is not None:
                self.journal.sync()  # the progress file must never be ahead of the journal on disk
            path = self.progress.save(snapshot)
            faults.point("orchestrator.before_compaction")
            if self.journal is not None:
                self.journal.compact(step)  # after the save: a replay starts from this progress
            self.emit("checkpoint", f"progress of step {step} saved to {path}", step=step)
