"""Which policy a replica serves, which one it should load next, and whom it has told.

No sockets and no vLLM here: the weight-sync loop (:mod:`rlbus.services.inference.sync`)
feeds announcements in and acts on the answers.

Ordering rule: the *newest publication* wins, compared by ``published_at`` (the
trainer's clock), not by step number. Normally both grow together; after a
trainer restarts from an older checkpoint it republishes lower step numbers,
and those are the weights to serve. A stale answer to a ``WeightsQuery`` that
arrives after a newer announcement is ignored for the same reason.

Retry rule: a publication that failed to load is tried again after a wait that
doubles with each failure (``retry_first_s`` up to ``retry_max_s``) until it loads
or a newer one supersedes it. The run may need exactly that step (with
``max_async_level = 0`` the orchestrator waits for it and the trainer publishes
nothing newer meanwhile), so giving up on it would stall the run for good.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from rlbus.messages import PolicyLoaded, WeightsAnnounced

BASE_STEP = 0
"""Policy step of the weights in the model directory (before any trainer update)."""

State = Literal["starting", "ready", "swapping"]


@dataclass(frozen=True)
class ServedPolicy:
    """The weights currently loaded."""

    step: int
    published_at: float
    """Trainer's publication time of the step; 0 for the base weights."""
    loaded_at: float
    source: Literal["base", "trainer"]


@dataclass
class LoadReport:
    """What one weight load did (returned by the engine's loader)."""

    ok: bool
    step: int
    num_bytes: int = 0
    fetch_s: float = 0.0
    load_s: float = 0.0
    error: str = ""
    kind: str = ""
    """On failure: ``transfer`` (nothing loaded, old weights serve) or ``load`` (model may be partly updated)."""
    relay_bytes: int = 0
    """Of the bytes fetched, those peer replicas' relays sent (``inference.weights_upstream``)."""
    trainer_bytes: int = 0
    """Of the bytes fetched, those the trainer sent."""
    broadcast_bytes: int = 0
    """Bytes of the step taken from the trainer's broadcast (``weight_transport = "collective"``), not fetched."""

    @property
    def seconds(self) -> float:
        return self.fetch_s + self.load_s

    @property
    def mb_per_s(self) -> float:
        return self.num_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class PolicyTracker:
    """The served policy, the newest announcement worth loading, and the swap state."""

    def __init__(self, retry_first_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        self.served: ServedPolicy | None = None
        self.state: State = "starting"
        self.last_error: str | None = None
        """The latest failed swap (kept after later successes, for /health)."""
        self.num_swaps = 0
        self.num_failed = 0
        self.retry_first_s = retry_first_s
        self.retry_max_s = retry_max_s
        self._pending: WeightsAnnounced | None = None
        self._retry: WeightsAnnounced | None = None
        """The newest publication that failed to load, due again at ``_retry_at`` (monotonic)."""
        self._retry_at = 0.0
        self._failed_key: tuple[int, float] | None = None
        """(step, published_at) of the latest failed publication; ``_num_attempts`` counts its failures."""
        self._num_attempts = 0

    @property
    def step(self) -> int | None:
        return self.served.step if self.served else None

    @property
    def ready(self) -> bool:
        return self.served is not None and self.state == "ready"

    def offer(self, announced: WeightsAnnounced) -> bool:
        """Remember ``announced`` if it is newer than what is served and pending; True if kept."""
        if not self._is_newer(announced.published_at):
            return False
        if self._retry is not None:
            if announced.published_at <= self._retry.published_at:
                return False  # the failed one again (a WeightsQuery answer): it waits for its retry time
            self._retry = None  # superseded
        if self._pending is not None and self._pending.published_at >= announced.published_at:
            return False
        self._pending = announced
        return True

    def take_pending(self) -> WeightsAnnounced | None:
        """The publication to load next (cleared: a newer one may be offered meanwhile)."""
        pending, self._pending = self._pending, None
        if pending is not None and not self._is_newer(pending.published_at):
            return None
        return pending

    def begin_swap(self) -> None:
        self.state = "swapping"

    def loaded(self, step: int, published_at: float, source: Literal["base", "trainer"]) -> ServedPolicy:
        self.served = ServedPolicy(step=step, published_at=published_at, loaded_at=time.time(), source=source)
        self.state = "ready"
        self.num_swaps += 1
        if source == "trainer":
            self._failed_key, self._num_attempts = None, 0
            if self._retry is not None and published_at >= self._retry.published_at:
                self._retry = None
        return self.served

    def failed(self, announced: WeightsAnnounced | None, error: str, now: float | None = None) -> float | None:
        """A swap (to ``announced``, or to the base weights if None) failed; what was served still is.
        Returns the seconds until ``announced`` is tried again (None for the base weights)."""
        self.last_error = f"step {announced.step}: {error}" if announced else f"base weights: {error}"
        self.num_failed += 1
        self.state = "ready" if self.served is not None else "starting"
        if announced is None:
            return None
        key = (announced.step, announced.published_at)
        self._num_attempts = self._num_attempts + 1 if key == self._failed_key else 1
        self._failed_key = key
        if self._pending is not None and self._pending.published_at <= announced.published_at:
            self._pending = None  # re-offered during the swap: it waits like the failed one
        wait = min(self.retry_max_s, self.retry_first_s * 2 ** (self._num_attempts - 1))
        self._retry, self._retry_at = announced, (time.monotonic() if now is None else now) + wait
        return wait

    def retry_in(self, now: float) -> float | None:
        """Seconds (from monotonic ``now``) until a failed publication is due again; None if none waits."""
        return None if self._retry is None else max(0.0, self._retry_at - now)

    def retry_due(self, now: float) -> bool:
        """Make the failed publication pending again once its wait is over; True if it was."""
        retry = self._retry
        if retry is None or now < self._retry_at:
            return False
        self._retry = None  # set again if this try fails too
        if not self._is_newer(retry.published_at):
            return False
        if self._pending is None or self._pending.published_at < retry.published_at:
            self._pending = retry
        return True

    def _is_newer(self, published_at: float) -> bool:
        return self.served is None or published_at > self.served.published_at


class PolicyReporter:
    """Tells the orchestrator which step is served until it acknowledges.

    ``due`` gives the ``PolicyLoaded`` to send at each heartbeat; an ``Ack`` whose
    ref is :func:`policy_ref` of the served step stops the repeats, and a swap to
    another step starts them again.
    """

    def __init__(self, replica_id: str, base_url: str) -> None:
        self.replica_id = replica_id
        self.base_url = base_url
        self._served: ServedPolicy | None = None
        self._acknowledged = False

    def served(self, policy: ServedPolicy) -> None:
        if policy != self._served:
            self._served, self._acknowledged = policy, False

    def due(self) -> PolicyLoaded | None:
        if self._served is None or self._acknowledged:
            return None
        return PolicyLoaded(
            replica_id=self.replica_id, base_url=self.base_url, step=self._served.step, loaded_at=self._served.loaded_at
        )

    def peer_connected(self) -> None:
        """A (new or restarted) orchestrator connected: it must hear the served step again."""
        self._acknowledged = False

    def acknowledged(self, ref: str) -> bool:
        """Record an ``Ack``; True if it acknowledged the step served now."""
        if self._served is not None and ref == policy_ref(self._served.step):
            self._acknowledged = True
        return self._acknowledged

    @property
    def is_acknowledged(self) -> bool:
        return self._acknowledged


def policy_ref(step: int) -> str:
    """The ``Ack.ref`` that acknowledges ``PolicyLoaded`` of ``step``."""
    return f"policy:{step}"
