"""The orchestrator's decisions, without sockets.

:class:`Orchestrator` takes the messages of its three channels (tasks,
batches, policy) as method calls and puts what must be sent into an
:class:`Outbox`; :mod:`rlbus.services.orchestrator.service` owns the sockets and
calls :meth:`Orchestrator.tick` after every burst of messages. Tests drive
this class directly. Results are checked and stored by its
:class:`~rlbus.services.orchestrator.intake.ResultIntake`, built steps delivered to the trainer
by its :class:`~rlbus.services.orchestrator.delivery.BatchDelivery`.

Steps count from 1, as the trainer's do: batch ``s`` is trained as step
``s`` and yields policy ``s``; the base model is policy 0. Batch ``s`` is
on-policy when sampled by policy ``s - 1``; a rollout sampled by policy ``p``
is ``s - 1 - p`` steps off-policy in it.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from rlbus.messages import (
    Ack,
    BatchAck,
    BatchRequest,
    PolicyLoaded,
    Refused,
    ResultAck,
    RolloutResult,
    RolloutSamples,
    RolloutTask,
    TaskRequest,
    TrainBatch,
)  # fmt: skip
from rlbus.services.orchestrator.batches import BatchStore
from rlbus.services.orchestrator.buffer import Group, GroupBuffer, PolicyGate
from rlbus.services.orchestrator.builder import BuiltStep, build_step
from rlbus.services.orchestrator.checkpoint import ProgressState, ProgressStore
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.delivery import BatchDelivery
from rlbus.services.orchestrator.evaluation import EvalRound, EvalScheduler
from rlbus.services.orchestrator.intake import ResultIntake
from rlbus.services.orchestrator.journal import Journal, Replay
from rlbus.services.orchestrator.leases import TaskLedger, WorkerPool, dispatch
from rlbus.services.orchestrator.sampler import Draw, TaskSampler, existing_draws
from rlbus.services.orchestrator.step_metrics import StepMetrics
from rlbus.services.orchestrator.task_factory import TaskFactory

NEVER_STALE = 2**31 - 1
"""``max_off_policy_steps`` of the buffer in ``sft`` mode."""


@dataclass
class Outbox:
    """What the service loop must send after a call into the core."""

    tasks: list[tuple[bytes, RolloutTask]] = field(default_factory=list)
    batches: list[tuple[bytes, TrainBatch]] = field(default_factory=list)
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    samples: list[RolloutSamples] = field(default_factory=list)
    events: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    """(kind, message, level, fields) for the monitor."""


class Orchestrator:
    """Sampling, leases, staleness, batch building and delivery for one run."""

    def __init__(self, config: OrchestratorConfig, train_sizes: list[int], eval_sizes: list[int],
                 progress: ProgressStore | None = None, resume: ProgressState | None = None,
                 clock: Callable[[], float] = time.monotonic, journal: Journal | None = None,
                 replay: Replay | None = None) -> None:  # fmt: skip
        if config.sampling.temperature <= 0:
            raise ValueError(
                f"sampling.temperature = {config.sampling.temperature}: training needs a temperature "
                "above 0 (the trainer divides its logits by it); greedy decoding is for evaluation"
            )
        if config.training_mode == "opd" and (config.sampling.temperature, config.sampling.top_p) != (1.0, 1.0):
            logger.warning("opd with sampling temperature {} and top_p {}: the teacher's prompt logprobs are at "
                           "temperature 1 without top-p, so the advantages mix two distributions (docs/training.md)",
                           config.sampling.temperature, config.sampling.top_p)  # fmt: skip
        self.config = config
        self.clock = clock
        self.groups_per_batch = config.batch_size // config.rollouts_per_example
        self.max_steps = config.max_steps
        state = resume or ProgressState()
        self.totals = Counter(samples=state.total_samples, tokens=state.total_tokens, problems=state.total_problems)
        ratios = [env.ratio for env in config.train.env]
        self.sampler = TaskSampler(train_sizes, ratios, config.seed, state.sampler if resume else None)
        self.train_sizes = train_sizes
        self.pending_draws: deque[Draw] = deque(existing_draws(state.pending, train_sizes))
        self.ledger = TaskLedger(config.task_lease_s, config.max_task_issues)
        self.workers = WorkerPool()
        # A teacher's rollouts (sft) were sampled by no policy of this run: they never go stale.
        self.buffer = GroupBuffer(config.max_off_policy_steps if config.training_mode != "sft" else NEVER_STALE)
        self.gate = PolicyGate(config.max_async_level)
        self.evals = EvalScheduler(config.eval, eval_sizes, final_step=config.max_steps)
        self._trained_at: float | None = None
        """When every step was first seen trained (the wait for the last policy's evaluation starts)."""
        self.step_metrics = StepMetrics(clock())
        self.outbox = Outbox()
        self.tasks = TaskFactory(config, self.ledger)
        self._journal = journal
        self.delivery = BatchDelivery(config, state.step, self.step_metrics, self._event, progress, journal)
        self.intake = ResultIntake(config, train_sizes, self.ledger, self.buffer, self.evals, self.step_metrics,
                                   journal, self._report_eval)  # fmt: skip
        if replay is not None:
            self._restore(replay)
        self.delivery.acknowledge_resumed()

    def _restore(self, replay: Replay) -> None:
        """Rebuild the steps built after progress ``replay.step`` and put the other journaled
        groups back into the buffer."""
        self.ledger.mark_finished(replay.accepted_task_ids)
        groups: dict[str, Group] = {}
        for result in replay.results:
            draw = self.intake.adopt(result)
            if draw is None:
                continue  # the training environments changed since it was accepted
            if draw in self.pending_draws:
                self.pending_draws.remove(draw)  # its rollouts are here: not to be sampled again
            groups[result.task_id] = Group(result.task_id, result.env_id, draw, result.rollouts)
        for step, task_ids in replay.built_after.items():
            if step != self.step or not all(t in groups for t in task_ids):
                break  # cannot happen with an intact journal; the groups go back to the buffer
            self._rebuild(step, [groups.pop(t) for t in task_ids])
        self.buffer.restore(groups.values())
        if self.journal is not None:
            self.journal.resumed(replay.step, len(self.buffer) + self.delivery.num_unacked_groups)
        if replay.results:
            logger.info("journal: {} step(s) rebuilt after step {}, {} accepted group(s) back in the buffer",
                        len(self.delivery.step_tasks), replay.step, len(self.buffer))  # fmt: skip

    def _rebuild(self, step: int, groups: list[Group]) -> None:
        """Build ``step`` again exactly as before the restart (no metrics: they were reported)."""
        built = build_step(step, groups, self.config)
        self.totals.update(samples=built.num_samples, tokens=built.num_tokens, problems=built.num_problems)
        self.delivery.record_tasks(step, [g.task_id for g in groups], journaled=False)
        self.delivery.add(step, built.batches, self._snapshot(built_steps=step))

    # ---------------------------------------------------------------- state

    @property
    def done(self) -> bool:
        """Every step up to ``max_steps`` is acknowledged by the trainer, and evaluated when it is due
        (the last policy always is), and no evaluation is running."""
        return self._all_trained and not self.evals.rounds and not self._waiting_for_final_policy()

    def _waiting_for_final_policy(self) -> bool:
        """The last policy is still to be evaluated and ``eval.final_timeout_s`` has not run out."""
        if not self.evals.final_pending:
            return False
        now = self.clock()
        if self._trained_at is None:
            self._trained_at = now
        if now - self._trained_at <= self.config.eval.final_timeout_s:
            return True
        logger.warning("inference did not serve policy step {} within eval.final_timeout_s = {:g}s: finishing "
                       "without evaluating it", self.max_steps, self.config.eval.final_timeout_s)  # fmt: skip
        self.evals.skip_final()
        return False

    @property
    def _all_trained(self) -> bool:
        return self.delivery.all_trained

    @property
    def step(self) -> int:
        """Next batch step to build."""
        return self.delivery.next_step

    @step.setter
    def step(self, step: int) -> None:
        self.delivery.move_to(step)

    @property
    def journal(self) -> Journal | None:
        """Where accepted results, built and acknowledged steps are recorded (None: nowhere)."""
        return self._journal

    @journal.setter
    def journal(self, journal: Journal | None) -> None:
        self._journal = journal
        self.delivery.attach_journal(journal)
        self.intake.attach_journal(journal)

    @property
    def store(self) -> BatchStore:
        """Built batches until the trainer acknowledges them."""
        return self.delivery.store

    def waiting_for(self) -> str | None:
        """What progress is blocked on, for heartbeats; None when nothing is."""
        if self.done:
            return None
        if self._all_trained and not self.evals.rounds:
            return f"inference to load policy step {self.max_steps} to evaluate it (serving {self.gate.policy_step})"
        if self._all_trained:
            return f"results of {sum(len(r.pending) for r in self.evals.rounds)} eval tasks"
        if self._gate_closed:
            need = self.step - 1 - self.config.max_async_level
            return f"inference to load policy step {need} (serving {self.gate.policy_step})"
        if not self._building or self.store.num_held:
            return f"trainer to train step {self.store.acked_below}"
        return f"results of {self.ledger.num_open()} tasks from env-workers ({self.workers.num_credits} credits)"

    def next_deadline(self) -> float | None:
        """Monotonic time at which :meth:`tick` must run even without messages (a lease expiry)."""
        return self.ledger.next_deadline()

    @property
    def _building(self) -> bool:
        return self.max_steps is None or self.step <= self.max_steps

    @property
    def _gate_closed(self) -> bool:
        """The next step waits for inference to load a newer policy."""
        return self._building and not self.gate.allows(self.step)

    # --------------------------------------------------------------- inputs

    def on_task_request(self, identity: bytes, request: TaskRequest) -> None:
        if request.num_tasks < 0:
            raise ValueError(f"TaskRequest from {request.worker_id!r} asks for {request.num_tasks} tasks")
        for previous in self.workers.grant(identity, request, self.clock()):
            logger.warning("env-worker {} reconnected as a new process", request.worker_id)
            self.on_worker_gone(previous)

    def on_worker_seen(self, identity: bytes) -> None:
        """Any message from ``identity`` shows the worker is alive."""
        self.workers.seen(identity, self.clock())

    def on_worker_gone(self, identity: bytes) -> None:
        """A send to ``identity`` failed: forget its credits and re-issue its tasks."""
        name = self.workers.name_of(identity)
        lost = self.ledger.release_worker(identity)
        self.workers.forget(identity)
        logger.warning("env-worker {} is gone; re-issuing its {} task(s)", name, len(lost))

    def on_policy_loaded(self, report: PolicyLoaded) -> Ack | Refused:
        newest = self.step - 1
        if report.step > newest:
            # A policy of a step never built cannot exist; taken, it would open the gate for good. A
            # trainer ahead of a fresh orchestrator fast-forwards it, and the replica's next report fits.
            return Refused(
                request="PolicyLoaded",
                reason=(f"policy step {report.step} is newer than any step this orchestrator built (step {newest})"),
            )
        if self.gate.update(report):
            logger.info("inference serves policy step {} ({})", report.step, report.replica_id)
        return Ack(ref=f"policy:{report.step}")

    def on_result(self, result: RolloutResult) -> ResultAck:
        """Store a result (or refuse it, saying why); the ack tells the worker to forget it."""
        return self.intake.on_result(result, self.step, self.gate.policy_step)

    def on_unreadable_result(self, identity: bytes, task_id: str, problem: str) -> ResultAck:
        """A result for ``task_id`` arrived but did not decode: refused, its task issued again or given up."""
        return self.intake.on_unreadable_result(identity, task_id, problem)

    def on_batch_request(self, identity: bytes, request: BatchRequest) -> TrainBatch | Refused | None:
        """The rank's batch, a refusal, or None when the step is not built yet (answered later)."""
        return self.delivery.on_batch_request(identity, request)

    def on_batch_ack(self, ack: BatchAck) -> None:
        """Forget the step's batches (not answered: the next ``BatchRequest`` acknowledges too)."""
        self.delivery.on_batch_ack(ack)

    # ----------------------------------------------------------------- tick

    def tick(self) -> Outbox:
        """Expire leases, start evals, build ready steps, issue and dispatch tasks."""
        now = self.clock()
        for identity in self.workers.silent(now, self.config.worker_timeout_s):
            logger.warning("env-worker {} silent for {:g}s", self.workers.name_of(identity),
                           self.config.worker_timeout_s)  # fmt: skip
            self.on_worker_gone(identity)
        expired = self.ledger.expire(now)
        if expired:
            logger.warning("{} task lease(s) expired after {}s", len(expired), self.config.task_lease_s)
        self._settle_abandoned()
        self._start_due_eval()
        self.step_metrics.track_gate(self._gate_closed, now)
        self._build_ready_steps(now)
        # A build can close the gate: its wait starts now, not at the next tick.
        self.step_metrics.track_gate(self._gate_closed, now)
        self._issue_training_tasks()
        self.outbox.tasks += dispatch(self.ledger, self.workers, now, time.time())
        outbox, self.outbox = self.outbox, Outbox()
        return outbox

    def _build_ready_steps(self, now: float) -> None:
        while self._building and self.gate.allows(self.step):
            stale = self.buffer.drop_stale(self.step)
            if stale and self.journal is not None:
                self.journal.dropped("stale", [g.task_id for g in stale])
            groups = self.buffer.take(self.step, self.groups_per_batch)
            if groups is None:
                return
            # Results arrive in any order; a batch in draw order packs (and sums) the same way every run.
            groups.sort(key=lambda group: (group.draw.env_index, group.draw.example_id))
            self.delivery.record_tasks(self.step, [g.task_id for g in groups])
            self._publish(build_step(self.step, groups, self.config), now)

    def _publish(self, built: BuiltStep, now: float) -> None:
        step = built.step
        self.totals.update(samples=built.num_samples, tokens=built.num_tokens, problems=built.num_problems)
        self.outbox.batches += self.delivery.add(step, built.batches, self._snapshot(built_steps=step))
        metrics = self.step_metrics.report(built, now, self.buffer, self.ledger, self.totals, self.gate.policy_step)
        self.outbox.metrics.append((step, metrics))
        if step % self.config.samples_interval == 0 and built.samples:
            self.outbox.samples.append(RolloutSamples(step=step, samples=built.samples))
        reward = metrics.get("reward/all/mean")
        logger.info("built step {}: {} samples, {} tokens, reward {}", step, built.num_samples, built.num_tokens,
                    "n/a" if reward is None else f"{reward:.3f}")  # fmt: skip

    def _issue_training_tasks(self) -> None:
        if not self._building or not self.gate.allows(self.step):
            return
        missing = self.groups_per_batch - len(self.buffer) - self.ledger.num_open(is_eval=False)
        for _ in range(missing):
            draw = self.pending_draws.popleft() if self.pending_draws else self.sampler.draw()
            task = self.tasks.training(draw.env_index, draw.example_id, self.step)
            self.intake.issued(task.task_id, draw)
            self.ledger.add(task)

    def _settle_abandoned(self) -> None:
        """Count and report tasks the ledger gave up; a training task's draw is not drawn again
        (it may be the poison), the next issue draws a fresh example in its place."""
        for abandoned in self.ledger.take_abandoned():
            task = abandoned.task
            self.step_metrics.drop("abandoned_tasks")
            self.intake.forget(task.task_id)
            if task.is_eval:
                self._report_eval(self.evals.abandon(task.task_id))
            logger.warning("abandoned task {} ({}#{}): {}", task.task_id, task.env_id, task.example_id,
                           abandoned.reason)  # fmt: skip
            self._event("task_abandoned", f"task {task.task_id} ({task.env_id}#{task.example_id}) abandoned: "
                        f"{abandoned.reason}", "warning", task_id=task.task_id, env_id=task.env_id,
                        example_id=task.example_id, is_eval=task.is_eval)  # fmt: skip

    def _start_due_eval(self) -> None:
        policy_step = self.gate.policy_step
        if not self.gate.has_reports or not self.evals.due(policy_step):
            return
        planned = self.evals.start(policy_step, self.tasks.new_task_id)
        for task_id, spec, example_id in planned:
            self.ledger.add(self.tasks.evaluation(spec.id, spec.loader_args, example_id, spec.rollouts_per_example,
                                                  policy_step, task_id, spec.temperature))  # fmt: skip
        logger.info("evaluating policy step {}: {} tasks", policy_step, len(planned))

    def _report_eval(self, finished: EvalRound | None) -> None:
        if finished is None:
            return
        metrics = finished.metrics()
        self.outbox.metrics.append((finished.policy_step, metrics))
        logger.info("eval of policy step {}: {}", finished.policy_step,
                    ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "@" in k))  # fmt: skip

    def _snapshot(self, built_steps: int) -> ProgressState:
        return ProgressState(
            step=built_steps, total_samples=self.totals["samples"], total_tokens=self.totals["tokens"],
            total_problems=self.totals["problems"], sampler=self.sampler.snapshot(), pending=self._undone_draws(),
        )  # fmt: skip

    def _undone_draws(self) -> list[Draw]:
        """Examples drawn but not in a built batch: in flight, buffered, or not issued yet."""
        in_flight = self.intake.draws_of(self.ledger.open_task_ids())
        return in_flight + [g.draw for g in self.buffer] + list(self.pending_draws)

    def _event(self, kind: str, message: str, level: str = "info", **fields: Any) -> None:
        self.outbox.events.append((kind, message, level, fields))
