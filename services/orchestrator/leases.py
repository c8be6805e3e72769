"""Tasks on their way through env-workers: credits, leases, re-issue, duplicates.

A task is *queued* until a worker with credit for its environment exists,
then *leased* to that worker until its result arrives or ``lease_s`` passes.
An expired lease puts the task back at the front of the queue under the
same ``task_id``: whichever result arrives first is kept, a later one is a
duplicate. So a worker that dies (or hangs) loses no task, and nothing is
trained twice. A task is issued at most ``max_issues`` times: one whose
result never arrives or never decodes that often is *abandoned* (a poison
example, or one no worker can finish), so the orchestrator can replace it
with a fresh draw instead of waiting one group short forever.

Credits follow ``TaskRequest``: each request adds ``num_tasks`` credits for
that worker; each task sent spends one. Workers also send ``TaskRequest(num_tasks=0)``
as a keepalive: a worker silent for ``worker_timeout_s`` is taken for dead, and so is
the previous connection of a worker that reconnects under the same name (it was
restarted), so its leased tasks go to others at once instead of after ``lease_s``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import msgspec

from rlbus.messages import RolloutTask, TaskRequest


class Completion(Enum):
    """What a result means for the ledger."""

    NEW = "new"
    """First result of an open task: use it."""
    DUPLICATE = "duplicate"
    """The task already has a result: drop this one."""
    UNKNOWN = "unknown"
    """Not a task of this ledger (e.g. issued before an orchestrator restart)."""
    ABANDONED = "abandoned"
    """The task was given up after too many issues; a fresh draw replaced it."""


@dataclass
class OpenTask:
    task: RolloutTask
    worker: bytes | None = None
    """Identity of the worker holding the lease; None while queued."""
    expires_at: float = float("inf")
    num_issues: int = 0
    failures: list[str] = field(default_factory=list)
    """Why each earlier issue came to nothing (lease expired, worker gone, result unreadable)."""


@dataclass
class Abandoned:
    """A task given up after ``max_issues`` issues, and why."""

    task: RolloutTask
    reason: str


@dataclass
class TaskLedger:
    """Open tasks (queued or leased), finished task ids, and lease deadlines."""

    lease_s: float
    max_issues: int = 3
    open: dict[str, OpenTask] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)
    finished: set[str] = field(default_factory=set)
    abandoned: dict[str, Abandoned] = field(default_factory=dict)
    """Abandoned task ids; the ones not yet taken by :meth:`take_abandoned` are ``_new_abandoned``."""
    num_reissued: int = 0
    _new_abandoned: list[Abandoned] = field(default_factory=list)
    _deadlines: list[tuple[float, int, str]] = field(default_factory=list)
    _tiebreak: itertools.count = field(default_factory=itertools.count)

    def add(self, task: RolloutTask) -> None:
        if task.task_id in self.open or task.task_id in self.finished:
            raise ValueError(f"task id {task.task_id!r} is already used")
        self.open[task.task_id] = OpenTask(task)
        self.queue.append(task.task_id)

    def uses(self, task_id: str) -> bool:
        """Whether ``task_id`` is taken: open, finished, abandoned, or named by a result (a
        peer may name an id before this run issues it; the id is then skipped, not reused)."""
        return task_id in self.open or task_id in self.finished or task_id in self.abandoned

    def lease(self, task_id: str, worker: bytes, now: float, wall_time: float) -> RolloutTask:
        """Mark ``task_id`` as sent to ``worker``; returns the task message to send."""
        entry = self.open[task_id]
        entry.worker, entry.expires_at, entry.num_issues = worker, now + self.lease_s, entry.num_issues + 1
        heapq.heappush(self._deadlines, (entry.expires_at, next(self._tiebreak), task_id))
        return msgspec.structs.replace(entry.task, lease_s=self.lease_s, issued_at=wall_time)

    def complete(self, task_id: str) -> tuple[Completion, RolloutTask | None]:
        """Close ``task_id`` on its first result; returns what the result is, and the task if it was open.
        An unknown id is remembered too, so its late duplicates are recognised."""
        if task_id in self.abandoned:
            return Completion.ABANDONED, None
        if task_id in self.finished:
            return Completion.DUPLICATE, None
        self.finished.add(task_id)
        entry = self.open.pop(task_id, None)
        if entry is None:
            return Completion.UNKNOWN, None
        return Completion.NEW, entry.task

    def expire(self, now: float) -> list[str]:
        """Re-queue (at the front) every leased task whose lease ran out; returns their ids."""
        expired = []
        while self._deadlines and self._deadlines[0][0] <= now:
            expires_at, _, task_id = heapq.heappop(self._deadlines)
            entry = self.open.get(task_id)
            # Stale heap entries (finished or re-leased tasks) are skipped.
            if entry is not None and entry.worker is not None and entry.expires_at == expires_at:
                expired.append(task_id)
        self._requeue(expired, f"its lease of {self.lease_s:g}s expired")
        return expired

    def release_worker(self, worker: bytes) -> list[str]:
        """Re-queue every task leased to ``worker`` (it is known to be gone)."""
        lost = [task_id for task_id, entry in self.open.items() if entry.worker == worker]
        self._requeue(lost, "its worker was gone")
        return lost

    def fail(self, task_id: str, worker: bytes, why: str) -> bool:
        """The issue of ``task_id`` to ``worker`` came to nothing (its result was unreadable):
        re-queue it now rather than at lease expiry. Only the lease holder can fail a task."""
        entry = self.open.get(task_id)
        if entry is None or entry.worker != worker:
            return False
        self._requeue([task_id], why)
        return True

    def take_abandoned(self) -> list[Abandoned]:
        """Tasks abandoned since the previous call."""
        taken, self._new_abandoned = self._new_abandoned, []
        return taken

    def next_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][2] not in self.open:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def num_open(self, is_eval: bool | None = None) -> int:
        """Open tasks, of one kind unless ``is_eval`` is None."""
        return sum(is_eval is None or entry.task.is_eval == is_eval for entry in self.open.values())

    def open_task_ids(self) -> list[str]:
        """Tasks queued or leased, oldest first."""
        return list(self.open)

    def mark_finished(self, task_ids: Iterable[str]) -> None:
        """Tasks whose results were accepted before a restart: a result resent for one is a duplicate."""
        self.finished.update(task_ids)

    def take_num_reissued(self) -> int:
        """Tasks put back in the queue (lease expired, worker gone) since the previous call."""
        num_reissued, self.num_reissued = self.num_reissued, 0
        return num_reissued

    def _requeue(self, task_ids: list[str], why: str) -> None:
        for task_id in reversed(task_ids):
            entry = self.open[task_id]
            entry.failures.append(why)
            if entry.num_issues >= self.max_issues:
                self._abandon(task_id, entry)
                continue
            entry.worker, entry.expires_at = None, float("inf")
            self.queue.appendleft(task_id)
            self.num_reissued += 1

    def _abandon(self, task_id: str, entry: OpenTask) -> None:
        del self.open[task_id]
        reason = f"issued {entry.num_issues} times without a usable result: " + "; ".join(entry.failures)
        self.abandoned[task_id] = Abandoned(entry.task, reason)
        self._new_abandoned.append(self.abandoned[task_id])


@dataclass
class Worker:
    name: str
    credits: int = 0
    env_ids: frozenset[str] = frozenset()
    """Environments the worker runs; empty means all."""
    last_seen: float = 0.0
    """Monotonic time of its latest message."""

    def accepts(self, env_id: str) -> bool:
        return self.credits > 0 and (not self.env_ids or env_id in self.env_ids)


@dataclass
class WorkerPool:
    """Credits of the env-workers, keyed by their ROUTER identity."""

    workers: dict[bytes, Worker] = field(default_factory=dict)

    def grant(self, identity: bytes, request: TaskRequest, now: float = 0.0) -> list[bytes]:
        """Add the request's credits; returns older connections of the same worker name (restarted)."""
        worker = self.workers.setdefault(identity, Worker(request.worker_id))
        worker.name, worker.env_ids = request.worker_id, frozenset(request.env_ids)
        worker.credits += request.num_tasks
        worker.last_seen = now
        return [other for other, w in self.workers.items() if other != identity and w.name == request.worker_id]

    def seen(self, identity: bytes, now: float) -> None:
        if identity in self.workers:
            self.workers[identity].last_seen = now

    def silent(self, now: float, timeout_s: float) -> list[bytes]:
        """Workers not heard from for ``timeout_s``."""
        return [identity for identity, w in self.workers.items() if now - w.last_seen > timeout_s]

    def pick(self, env_id: str) -> bytes | None:
        """The worker with the most credit that runs ``env_id`` (spreads load), or None."""
        candidates = [(w.credits, identity) for identity, w in self.workers.items() if w.accepts(env_id)]
        return max(candidates)[1] if candidates else None

    def name_of(self, identity: bytes) -> str:
        """The worker's name, for logs; the identity itself once the worker is forgotten."""
        worker = self.workers.get(identity)
        return worker.name if worker is not None else repr(identity)

    def spend(self, identity: bytes) -> None:
        self.workers[identity].credits -= 1

    def forget(self, identity: bytes) -> None:
        self.workers.pop(identity, None)

    @property
    def num_credits(self) -> int:
        return sum(w.credits for w in self.workers.values())


def dispatch(ledger: TaskLedger, pool: WorkerPool, now: float, wall_time: float) -> list[tuple[bytes, RolloutTask]]:
    """Lease queued tasks to workers with credit, oldest first; returns (worker, task) to send.

    A task no worker can run now stays queued without blocking the tasks behind it.
    """
    sends, waiting = [], deque()
    while ledger.queue and pool.num_credits:
        task_id = ledger.queue.popleft()
        if task_id not in ledger.open:
            continue  # re-queued after its lease expired, then the late result arrived
        worker = pool.pick(ledger.open[task_id].task.env_id)
        if worker is None:
            waiting.append(task_id)
            continue
        pool.spend(worker)
        sends.append((worker, ledger.lease(task_id, worker, now, wall_time)))
    ledger.queue.extendleft(reversed(waiting))
    return sends
