"""Service health from heartbeats: who is alive, dead, stopped or stalled.

Two kinds of stall: a replica that says it waits for the same thing for
``stalled_after_s`` (a warning naming what it waits for), and a step reporter
(trainer, orchestrator) that keeps heartbeating while its step does not move for
``progress_stalled_after_s``: STALLED, an error, shown as ``stalled`` in its row
until the step moves again. A hung process whose heartbeat thread still runs
(the trainer's pulse) is caught by the second.

Times are the monitor's clock (``now`` passed in), except wait durations:
they are measured on the sender's clock (``sent_at - waiting_since``) so a
skewed clock on another host cannot make a service look stalled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlbus.messages import Heartbeat, ServiceHealth


@dataclass(frozen=True)
class HealthNotice:
    """A change in a replica's health worth telling users about."""

    level: str
    """``info``, ``warning`` or ``error`` (STALLED), as for an ``Event``."""
    kind: str
    """``service_dead``, ``service_back``, ``service_stopped``, ``service_restarted`` or ``service_stalled``."""
    service: str
    replica_id: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReplicaState:
    """What the monitor knows about one replica."""

    heartbeat: Heartbeat
    last_seen: float
    wait_began: float | None = None
    """Monitor-clock start of the current wait, None when not waiting."""
    alive: bool = True
    stopped: bool = False
    stall_warned: bool = False
    step_since: float = 0.0
    """Monitor-clock time its step last changed (or it was first seen)."""
    progress_stalled: bool = False

    @property
    def name(self) -> str:
        return f"{self.heartbeat.service}/{self.heartbeat.replica_id}"


class HealthTable:
    """Last heartbeat per replica; :meth:`check` turns silence into dead or stopped."""

    def __init__(self, dead_after_s: float, stalled_after_s: float, progress_stalled_after_s: float = float("inf"),
                 progress_services: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.dead_after_s = dead_after_s
        self.stalled_after_s = stalled_after_s
        self.progress_stalled_after_s = progress_stalled_after_s
        self.progress_services = progress_services
        self.replicas: dict[tuple[str, str], ReplicaState] = {}

    def observe(self, heartbeat: Heartbeat, now: float) -> list[HealthNotice]:
        """Record a heartbeat; notices for replicas that came back or restarted."""
        key = (heartbeat.service, heartbeat.replica_id)
        state = self.replicas.get(key)
        notices = []
        if state is not None:
            notices += self._returns(state, heartbeat, now)
            waiting_changed = state.heartbeat.waiting_for != heartbeat.waiting_for
            notices += self._step_moved(state, heartbeat, now)
            state.heartbeat, state.last_seen = heartbeat, now
        else:
            state = self.replicas[key] = ReplicaState(heartbeat, now, step_since=now)
            waiting_changed = True
        if waiting_changed:
            state.stall_warned = False
        state.wait_began = _wait_began(heartbeat, now)
        state.alive, state.stopped = True, False
        return notices

    def check(self, now: float) -> list[HealthNotice]:
        """Notices for replicas that went silent or have waited too long since the last check."""
        notices = []
        for state in self.replicas.values():
            silent_s = now - state.last_seen
            if state.alive and silent_s >= self.dead_after_s:
                notices.append(self._silent(state, silent_s))
            elif state.alive and self._made_no_progress(state, now):
                state.progress_stalled = True
                beat = state.heartbeat
                notices.append(_notice(
                    state, "error", "service_stalled",
                    f"{state.name} is STALLED: heartbeating ({beat.status}) but its step {beat.step} has not "
                    f"advanced for {now - state.step_since:.0f}s"
                    + (f"; waiting for {beat.waiting_for}" if beat.waiting_for else ""),
                    step=beat.step, stalled_s=round(now - state.step_since, 1), pid=beat.pid, host=beat.host,
                ))  # fmt: skip
            elif state.alive and self._is_stalled(state, now):
                state.stall_warned = True
                waited_s = now - (state.wait_began or now)
                notices.append(_notice(
                    state, "warning", "service_stalled",
                    f"{state.name} has been waiting for {state.heartbeat.waiting_for} for {waited_s:.0f}s",
                    waiting_for=state.heartbeat.waiting_for, waited_s=round(waited_s, 1),
                ))  # fmt: skip
        return notices

    def rows(self) -> list[ServiceHealth]:
        """One row per replica, sorted by service and replica."""
        return [_row(state) for _, state in sorted(self.replicas.items())]

    def _made_no_progress(self, state: ReplicaState, now: float) -> bool:
        return (
            not state.progress_stalled
            and state.heartbeat.service in self.progress_services
            and state.heartbeat.status != "stopping"
            and now - state.step_since >= self.progress_stalled_after_s
        )

    def _step_moved(self, state: ReplicaState, heartbeat: Heartbeat, now: float) -> list[HealthNotice]:
        if heartbeat.step == state.heartbeat.step and heartbeat.pid == state.heartbeat.pid:
            return []
        state.step_since = now
        if not state.progress_stalled:
            return []
        state.progress_stalled = False
        return [_notice(state, "info", "service_progressing", f"{state.name} is progressing again: step "
                                                              f"{state.heartbeat.step} -> {heartbeat.step}")]

    def _is_stalled(self, state: ReplicaState, now: float) -> bool:
        return (
            not state.stall_warned
            and state.wait_began is not None
            and now - state.wait_began >= self.stalled_after_s
        )

    def _silent(self, state: ReplicaState, silent_s: float) -> HealthNotice:
        state.alive = False
        beat = state.heartbeat
        if beat.status == "stopping":
            state.stopped = True
            return _notice(state, "info", "service_stopped", f"{state.name} stopped (pid {beat.pid} on {beat.host})")
        step = f", step {beat.step}" if beat.step is not None else ""
        waiting = f", waiting for {beat.waiting_for}" if beat.waiting_for else ""
        return _notice(
            state, "warning", "service_dead",
            f"{state.name} is DEAD: no heartbeat for {silent_s:.0f}s (pid {beat.pid} on {beat.host}, "
            f"last status {beat.status}{step}{waiting})",
            silent_s=round(silent_s, 1), pid=beat.pid, host=beat.host, last_status=beat.status,
        )  # fmt: skip

    def _returns(self, state: ReplicaState, heartbeat: Heartbeat, now: float) -> list[HealthNotice]:
        old = state.heartbeat
        if (old.pid, old.host, old.started_at) != (heartbeat.pid, heartbeat.host, heartbeat.started_at):
            return [_notice(
                state, "info", "service_restarted",
                f"{state.name} restarted (pid {old.pid} on {old.host} -> pid {heartbeat.pid} on {heartbeat.host})",
                old_pid=old.pid, pid=heartbeat.pid,
            )]  # fmt: skip
        if not state.alive and not state.stopped:
            silent_s = now - state.last_seen
            return [_notice(state, "info", "service_back", f"{state.name} is back after {silent_s:.0f}s of silence",
                            silent_s=round(silent_s, 1))]
        return []


def _wait_began(heartbeat: Heartbeat, now: float) -> float | None:
    if heartbeat.waiting_for is None:
        return None
    if heartbeat.waiting_since is None:
        return now
    return now - max(0.0, heartbeat.sent_at - heartbeat.waiting_since)


def _notice(state: ReplicaState, level: str, kind: str, message: str, **fields: Any) -> HealthNotice:
    beat = state.heartbeat
    return HealthNotice(level, kind, beat.service, beat.replica_id, message, fields)


def _row(state: ReplicaState) -> ServiceHealth:
    beat = state.heartbeat
    status = beat.status if state.alive else ("stopped" if state.stopped else "dead")
    if state.alive and state.progress_stalled:
        status = "stalled"
    return ServiceHealth(
        service=beat.service, replica_id=beat.replica_id, status=status, alive=state.alive,
        last_seen=state.last_seen, step=beat.step, waiting_for=beat.waiting_for,
        waiting_since=beat.waiting_since, host=beat.host, pid=beat.pid,
    )  # fmt: skip
