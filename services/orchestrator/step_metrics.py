"""The metrics reported with each built step, beyond the batch's own.

What happened between two built steps (results refused, batches rejected, stale groups, tasks
issued again, time spent waiting for inference to load a newer policy) is counted over many
calls into :class:`~rlbus.services.orchestrator.core.Orchestrator` and reported once, with the
next built step. The counting and the report live here so the core keeps only its decisions,
and a step's report is made in one place.
"""

from __future__ import annotations

from collections import Counter

from rlbus.services.orchestrator.buffer import GroupBuffer
from rlbus.services.orchestrator.builder import BuiltStep
from rlbus.services.orchestrator.leases import TaskLedger


class StepMetrics:
    """Counts and timers since the previous built step, reported and reset with the next one."""

    def __init__(self, now: float) -> None:
        self.dropped: Counter[str] = Counter()
        """Counts since the last built step, reported as ``dropped/<reason>``."""
        self.num_errored_dropped = 0
        """Rollouts of dropped all-errored groups since the last built step (in ``errored_rollouts``)."""
        self._last_build = now
        self._gate_closed_at: float | None = None
        self._wait_for_policy_s = 0.0

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def drop_errored_group(self, num_rollouts: int) -> None:
        """A group whose rollouts all errored: its rollouts count as errored in the next step."""
        self.dropped["errored_groups"] += 1
        self.num_errored_dropped += num_rollouts

    def track_gate(self, closed: bool, now: float) -> None:
        """Accumulate the time spent waiting for inference to load a newer policy."""
        if closed and self._gate_closed_at is None:
            self._gate_closed_at = now
        elif not closed and self._gate_closed_at is not None:
            self._wait_for_policy_s += now - self._gate_closed_at
            self._gate_closed_at = None

    def report(self, built: BuiltStep, now: float, buffer: GroupBuffer, ledger: TaskLedger, totals: Counter[str],
               policy_step: int) -> dict[str, float]:  # fmt: skip
        """``built``'s metrics with everything counted since the previous step; the counts
        (these and the stale and reissued counts of ``buffer`` and ``ledger``) start again."""
        stale_groups, stale_rollouts = buffer.take_stale_counts()
        since = {f"dropped/{reason}": float(count) for reason, count in self.dropped.items()}
        since |= {
            "dropped/stale_rollouts": float(stale_rollouts),
            "dropped/stale_groups": float(stale_groups),
            "tasks/reissued": float(ledger.take_num_reissued()),
            # Not "time/step": that is the trainer's; this is the time since the previous batch was built.
            "time/batch_interval": now - self._last_build,
            "time/wait_for_ckpt": self._wait_for_policy_s,
            # The rest of the interval: rollouts of this batch were being generated and scored
            # (tasks are issued only while the policy gate is open). scripts/bench/rl.py divides by it.
            "time/generate": max(0.0, now - self._last_build - self._wait_for_policy_s),
            "progress/step": float(built.step),
            "progress/total_samples": float(totals["samples"]),
            "progress/total_tokens": float(totals["tokens"]),
            "progress/total_problems": float(totals["problems"]),
            "policy/loaded_step": float(policy_step),
        }
        metrics = built.metrics | since
        metrics["errored_rollouts"] = built.metrics["errored_rollouts"] + float(self.num_errored_dropped)
        self.dropped.clear()
        self.num_errored_dropped = 0
        self._last_build, self._wait_for_policy_s = now, 0.0
        return metrics
