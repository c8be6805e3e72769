"""Messages of the monitor's channels: telemetry from every service, and ``rlbus tail``'s live view.

:mod:`rlbus.messages` re-exports everything here.
"""

# ruff: noqa: RUF012 - msgspec copies a mutable default for each instance; ruff sees that only in
# direct subclasses of msgspec.Struct, not in those of Message and Payload.

from __future__ import annotations

from typing import ClassVar, Literal

from rlbus.messages_base import Message, Payload, Scalar

# --------------------------------------------------------------------------
# Telemetry: every service -> monitor (PUSH -> PULL, never blocks the sender)
# --------------------------------------------------------------------------


class Heartbeat(Message, kw_only=True):
    """Any service -> monitor, every ``bus.heartbeat_interval_s``."""

    service: str
    """Service name: inference, trainer, orchestrator, env-worker, monitor."""
    replica_id: str
    """Unique per process, e.g. ``env-worker-1``."""
    host: str
    pid: int
    started_at: float
    sent_at: float
    status: Literal["starting", "ready", "busy", "waiting", "stopping"] = "ready"
    step: int | None = None
    """The service's current step (trainer step, served policy step, ...)."""
    waiting_for: str | None = None
    """What the service is blocked on, if anything (shown by the monitor)."""
    waiting_since: float | None = None


class MetricsReport(Message, kw_only=True):
    """Any service -> monitor, once per step: ``{name: value}``."""

    service: str
    replica_id: str
    step: int
    sent_at: float
    metrics: dict[str, float]
    """Flat names as users know them, e.g. ``loss/mean``, ``reward/all/mean``."""


class Event(Message, kw_only=True):
    """Any service -> monitor: something happened (started, failed, ...)."""

    service: str
    replica_id: str
    sent_at: float
    level: Literal["debug", "info", "warning", "error"] = "info"
    kind: str
    """Machine-readable kind, e.g. ``started``, ``decode_error``, ``finished``."""
    message: str
    fields: dict[str, Scalar] = {}


class Sample(Payload, kw_only=True):
    """One rollout shown to humans (console, JSONL, W&B tables)."""

    env_id: str
    prompt: str
    completion: str
    reward: float
    advantage: float = 0.0
    answer: str | None = None
    """The example's reference answer, as text; None when the environment has none."""
    finish_reason: str = ""
    """Why the last turn ended: ``stop``, ``length`` (cut at ``max_tokens`` or the context), ...;
    ``error`` when the rollout errored."""
    num_prompt_tokens: int = 0
    """Tokens not sampled by the policy: the prompt plus environment replies of later turns."""
    num_completion_tokens: int = 0
    """Tokens sampled by the policy, over every turn."""
    policy_step: int = 0
    """The oldest policy step that sampled any turn of the rollout."""


class RolloutSamples(Message, kw_only=True):
    """Orchestrator -> monitor every ``samples_interval`` steps.

    Version 2 added the ``Sample`` fields after ``advantage``."""

    VERSION: ClassVar[int] = 2

    step: int
    samples: list[Sample]


# --------------------------------------------------------------------------
# Live view: ``rlbus tail`` (DEALER) <-> monitor (ROUTER, binds)
# --------------------------------------------------------------------------


class ViewRequest(Message, kw_only=True):
    """``rlbus tail`` -> monitor: send the current state.

    Answered with ``ViewSnapshot``, or ``Refused`` when the monitor has a
    ``view_api_key`` and ``api_key`` does not match it.
    """

    VERSION: ClassVar[int] = 2

    log_offset: int = 0
    """Number of log lines already seen; only newer ones are returned."""
    api_key: str | None = None
    """The monitor's ``view_api_key``, when it has one."""


class ServiceHealth(Payload, kw_only=True):
    """One replica's row of the monitor's health table (from its heartbeats)."""

    service: str
    replica_id: str
    status: str
    """Last reported ``Heartbeat.status``, or ``dead`` / ``stopped`` as judged by the monitor."""
    alive: bool
    """False once no heartbeat arrived for the monitor's ``dead_after_s``."""
    last_seen: float
    """Monitor's clock when the last heartbeat arrived."""
    step: int | None = None
    waiting_for: str | None = None
    """What the replica is blocked on, if anything."""
    waiting_since: float | None = None
    """Sender's clock when the wait began."""
    host: str = ""
    pid: int = 0


class ViewSnapshot(Message, kw_only=True):
    """Monitor -> ``rlbus tail``: the latest step's metrics, health, logs.

    ``metrics`` are those of ``step``, merged over services (the mean where
    replicas of one service report the same name); ``log_lines`` are the
    monitor's log lines (service events, dead services, step summaries)
    after the request's ``log_offset``; ``log_offset`` is the count so far.
    """

    VERSION: ClassVar[int] = 2

    step: int | None
    metrics: dict[str, float]
    health: list[ServiceHealth]
    log_lines: list[str]
    log_offset: int
    sent_at: float = 0.0
    """Monitor's clock when sent: ``ServiceHealth.last_seen`` ages are relative to it."""
