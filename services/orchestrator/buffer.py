"""Scored groups waiting for a batch, and the two staleness knobs.

Batch ``step`` (counted from 1) is on-policy when sampled by policy
``step - 1``; its lag behind that is what both knobs bound.

- ``max_async_level`` (:class:`PolicyGate`): the orchestrator works on batch
  ``step`` only while ``step - 1 - policy_step <= max_async_level``, where
  ``policy_step`` is the newest policy an inference replica reported loaded.
  While the gate is closed no training task is issued and no batch is built.
- ``max_off_policy_steps`` (:class:`GroupBuffer`): a group is discarded when
  ``step - 1 - oldest_policy_step`` of any of its rollouts exceeds the bound,
  both when it arrives and when a batch is taken, so no batch ever trains on
  a rollout older than that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from rlbus.messages import PolicyLoaded, Rollout
from rlbus.services.orchestrator.rollouts import oldest_policy_step
from rlbus.services.orchestrator.sampler import Draw


@dataclass
class Group:
    """The scored rollouts of one training task (one example)."""

    task_id: str
    env_id: str
    draw: Draw
    rollouts: list[Rollout]

    @property
    def oldest_policy_step(self) -> int:
        return min((oldest_policy_step(r) for r in self.rollouts if r.turns), default=0)

    def off_policy(self, step: int) -> int:
        """How many policy steps the oldest rollout lags the policy batch ``step`` should have
        been sampled by (``step - 1``); never negative."""
        return max(0, step - 1 - self.oldest_policy_step)


@dataclass
class GroupBuffer:
    """Accepted groups in arrival order; stale ones are dropped and counted."""

    max_off_policy_steps: int
    groups: deque[Group] = field(default_factory=deque)
    num_stale_groups: int = 0
    num_stale_rollouts: int = 0

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def is_stale(self, group: Group, step: int) -> bool:
        return group.off_policy(step) > self.max_off_policy_steps

    def add(self, group: Group, step: int) -> bool:
        """Keep ``group`` unless it is already too old for batch ``step``; True if kept."""
        if self.is_stale(group, step):
            self._count_stale(group)
            return False
        self.groups.append(group)
        return True

    def drop_stale(self, step: int) -> list[Group]:
        """Discard every group too old for batch ``step``; returns them."""
        stale = [g for g in self.groups if self.is_stale(g, step)]
        if stale:
            self.groups = deque(g for g in self.groups if not self.is_stale(g, step))
            for group in stale:
                self._count_stale(group)
        return stale

    def restore(self, groups: Iterable[Group]) -> None:
        """Put back groups accepted before a restart, in their order; :meth:`take` drops any
        that are stale by then."""
        self.groups.extend(groups)

    def take_stale_counts(self) -> tuple[int, int]:
        """(groups, rollouts) dropped as stale since the previous call."""
        counts = self.num_stale_groups, self.num_stale_rollouts
        self.num_stale_groups = self.num_stale_rollouts = 0
        return counts

    def take(self, step: int, count: int) -> list[Group] | None:
        """The ``count`` oldest groups fresh enough for ``step``, or None if there are fewer."""
        self.drop_stale(step)
        if len(self.groups) < count:
            return None
        return [self.groups.popleft() for _ in range(count)]

    def _count_stale(self, group: Group) -> None:
        self.num_stale_groups += 1
        self.num_stale_rollouts += len(group.rollouts)


@dataclass
class PolicyGate:
    """Tracks the policy step inference serves and whether ``step`` may proceed."""

    max_async_level: int
    replicas: dict[str, int] = field(default_factory=dict)
    """Replica id -> policy step it last reported."""

    @property
    def policy_step(self) -> int:
        """Newest policy any replica serves; 0 (the base model) before any report."""
        return max(self.replicas.values(), default=0)

    @property
    def has_reports(self) -> bool:
        return bool(self.replicas)

    def update(self, report: PolicyLoaded) -> bool:
        """Record a replica's report; True if the newest policy step moved forward."""
        before = self.policy_step
        self.replicas[report.replica_id] = report.step
        return self.policy_step > before

    def allows(self, step: int) -> bool:
        return step - 1 - self.policy_step <= self.max_async_level
