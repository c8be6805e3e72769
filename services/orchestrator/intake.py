"""The orchestrator's result intake: each ``RolloutResult`` checked, then kept or refused with a reason.

:class:`ResultIntake` completes the result's task in the ledger, checks the result against it, and
routes it: a training group into the buffer (journaled before the worker is acknowledged), an eval
result into its round. It also keeps the draw (environment and example) of every training task in
flight, which the core needs back for its progress snapshots.
"""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger

from rlbus import faults
from rlbus.messages import ResultAck, RolloutResult, RolloutTask
from rlbus.services.orchestrator.buffer import Group, GroupBuffer
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.evaluation import EvalRound, EvalScheduler
from rlbus.services.orchestrator.journal import Journal
from rlbus.services.orchestrator.leases import Completion, TaskLedger
from rlbus.services.orchestrator.rollouts import branched_problem, result_problem, unscored_problem
from rlbus.services.orchestrator.sampler import Draw
from rlbus.services.orchestrator.step_metrics import StepMetrics


class ResultIntake:
    """Checks results from env-workers and stores the training groups among them."""

    def __init__(self, config: OrchestratorConfig, train_sizes: list[int], ledger: TaskLedger, buffer: GroupBuffer,
                 evals: EvalScheduler, step_metrics: StepMetrics, journal: Journal | None,
                 report_eval: Callable[[EvalRound | None], None]) -> None:  # fmt: skip
        self.config = config
        self.train_sizes = train_sizes
        self.ledger = ledger
        self.buffer = buffer
        self.evals = evals
        self.step_metrics = step_metrics
        self.journal = journal
        self.report_eval = report_eval
        """Reports an eval round the result finished (None: none finished)."""
        self._draw_of: dict[str, Draw] = {}
        """Draw of each training task issued by this process and not settled yet."""

    def attach_journal(self, journal: Journal | None) -> None:
        """Record to ``journal`` from now on (None: record nothing)."""
        self.journal = journal

    # ------------------------------------------------------------ issued draws

    def issued(self, task_id: str, draw: Draw) -> None:
        self._draw_of[task_id] = draw

    def forget(self, task_id: str) -> None:
        """The task is given up: its draw is not drawn again."""
        self._draw_of.pop(task_id, None)

    def draws_of(self, task_ids: list[str]) -> list[Draw]:
        """The draws of those of ``task_ids`` that are training tasks in flight, in order."""
        return [self._draw_of[t] for t in task_ids if t in self._draw_of]

    def adopt(self, result: RolloutResult) -> Draw | None:
        """The draw of a training result this run did not issue (a worker resending after our
        restart): kept if it names a training environment and a valid example."""
        for index, spec in enumerate(self.config.train.env):
            if spec.id == result.env_id and 0 <= result.example_id < self.train_sizes[index]:
                return Draw(index, result.example_id)
        return None

    # ---------------------------------------------------------------- results

    def on_result(self, result: RolloutResult, step: int, policy_step: int) -> ResultAck:
        """Store a result for batch ``step`` (or refuse it, saying why); the ack tells the worker to
        forget it. ``policy_step`` is the newest policy inference serves."""
        status, task = self.ledger.complete(result.task_id)
        if status is Completion.DUPLICATE:
            self.step_metrics.drop("duplicate_results")
            return refuse(result, "duplicate: this task already has a result")
        if status is Completion.ABANDONED:
            return refuse(result, "abandoned: the task was given up after too many issues")
        problem = self._result_problem(result, task, max(policy_step, step))
        if problem is None and not result.is_eval and self.config.training_mode != "rl":
            problem = branched_problem(result) or (unscored_problem(result) if self.config.training_mode == "opd"
                                                   else None)  # fmt: skip
        if result.is_eval:
            return self._on_eval_result(result, status, problem)
        draw = self._draw_of.pop(result.task_id, None) if task is not None else self.adopt(result)
        if draw is None:
            problem = "not a task of this run"
        if problem is not None:
            self.step_metrics.drop("invalid_results")
            logger.warning("refused result {!r:.80} from {!r:.80}: {}", result.task_id, result.worker_id, problem)
            return refuse(result, problem)
        if all(r.error is not None for r in result.rollouts):
            # Infrastructure failures (inference down, environment crash) must not use up a training
            # step: the group is dropped and a fresh example takes its place.
            self.step_metrics.drop_errored_group(len(result.rollouts))
            return refuse(result, f"every rollout errored: {result.rollouts[0].error}")
        group = Group(result.task_id, result.env_id, draw, result.rollouts)  # type: ignore[arg-type]
        if not self.buffer.add(group, step):
            return refuse(result, f"stale: sampled by policy {group.oldest_policy_step}, "
                                  f"{group.off_policy(step)} steps behind step {step} "
                                  f"(max_off_policy_steps={self.config.max_off_policy_steps})")  # fmt: skip
        if self.journal is not None:
            self.journal.accepted(result)  # before the ack: the worker forgets what it was acked
            faults.point("orchestrator.before_result_ack")
        return ResultAck(task_ids=[result.task_id])

    def on_unreadable_result(self, identity: bytes, task_id: str, problem: str) -> ResultAck:
        """A result for ``task_id`` arrived but did not decode: refuse it (so the worker drops it
        rather than resending it forever) and issue the task again, or give it up."""
        self.step_metrics.drop("unreadable_results")
        self.ledger.fail(task_id, identity, f"its result was unreadable ({problem[:200]})")
        return ResultAck(task_ids=[task_id], accepted=False, reason=f"unreadable: {problem}")

    def _result_problem(self, result: RolloutResult, task: RolloutTask | None, max_policy_step: int) -> str | None:
        if task is not None and (task.env_id, task.example_id, task.is_eval) != (
                result.env_id, result.example_id, result.is_eval):  # fmt: skip
            return (f"result is for {result.env_id!r:.80}#{result.example_id} (eval {result.is_eval}), "
                    f"the task for {task.env_id}#{task.example_id} (eval {task.is_eval})")  # fmt: skip
        if task is not None:
            num_rollouts: int | None = task.num_rollouts
        else:  # adopted after a restart: a training group has the configured size
            num_rollouts = None if result.is_eval else self.config.rollouts_per_example
        return result_problem(result, num_rollouts, max_policy_step)

    def _on_eval_result(self, result: RolloutResult, status: Completion, problem: str | None) -> ResultAck:
        if status is Completion.UNKNOWN:
            return refuse(result, "unknown eval task (issued before a restart?)")
        if problem is not None:  # its example is left out of the round, which must still finish
            self.step_metrics.drop("invalid_results")
            self.report_eval(self.evals.abandon(result.task_id))
            return refuse(result, problem)
        self.report_eval(self.evals.record(result))
        return ResultAck(task_ids=[result.task_id])


def refuse(result: RolloutResult, reason: str) -> ResultAck:
    return ResultAck(task_ids=[result.task_id], accepted=False, reason=reason)
