"""Streams the monitor's step rows and samples to a Prime platform run without ever slowing the monitor.

The monitor's loop only appends to a bounded queue (:meth:`PlatformStream.log_step` returns at
once); one background thread sends, retrying transient failures (5xx, 429, timeouts, a platform
that is down) with exponential backoff for up to ``retry_budget_s`` per upload. Whatever cannot be
sent is counted, never waited for: a full queue (the platform unreachable for long) drops the new
upload, an upload that failed through its retries is dropped, and a refused key (401/403) stops the
stream, since no retry fixes it. At close the queue gets ``drain_s`` to empty; what is left then is
dropped and counted too. Non-finite metric values are dropped by name (strict JSON has no NaN).

A step's metrics are sent once the monitor releases its row. A service that reports the step
later (inference and env-workers report periodically) adds to the row, and the whole row is sent
again: the platform keeps one row per step (prime-runs' metrics sink), so the resend completes it.
Samples go at most once per :data:`SAMPLES_EVERY_STEPS` steps, the first at once (prime-rl's cadence).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import tenacity
from loguru import logger

from rlbus.messages import Sample
from rlbus.platform_client import PlatformClient, PlatformHTTPError, retrying
from rlbus.services.monitor.platform_samples import samples_parquet

QUEUE_SIZE = 1000
"""Uploads waiting at most; more are dropped (and counted) while the platform does not keep up."""
RETRY_BUDGET_S = 60.0
"""How long one upload is tried before it is dropped."""
DRAIN_S = 10.0
"""How long closing waits for the queue to empty: below ``rlbus rl``'s ``stop_timeout_s`` (30 s)."""
GIVE_UP_S = 2.0
"""After ``drain_s``, how long closing still waits for the sender to notice; then it is left behind."""
SAMPLES_EVERY_STEPS = 10
KEEP_ROWS = 64
"""Steps whose rows are kept for late reports."""


@dataclass
class Upload:
    """One queued request: a step's metrics row (sent as it is when taken), or a step's samples."""

    step: int
    row: dict[str, float] | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "metrics" if self.row is not None else "samples"


class PlatformStream:
    """A :class:`~rlbus.services.monitor.monitor.MetricsSink` that sends to platform run ``run_id``."""

    def __init__(self, client: PlatformClient, run_id: str, drain_s: float = DRAIN_S,
                 retry_budget_s: float = RETRY_BUDGET_S, queue_size: int = QUEUE_SIZE) -> None:  # fmt: skip
        self.client, self.run_id = client, run_id
        self.drain_s, self.retry_budget_s, self.queue_size = drain_s, retry_budget_s, queue_size
        self.counts: Counter[str] = Counter()
        """``metrics_sent``, ``samples_sent``, ``retries`` and ``dropped_<why>`` per kind of upload."""
        self.refused: str | None = None
        self.non_finite: set[str] = set()
        self._cond = threading.Condition()
        self._queue: deque[Upload] = deque()
        self._rows: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._queued_steps: set[int] = set()
        self._closing = False
        self._give_up = threading.Event()
        self._outage = False
        self._last_samples_step: int | None = None
        self._thread = threading.Thread(target=self._run, name="prime-platform", daemon=True)
        self._thread.start()

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        finite = {name: value for name, value in metrics.items() if math.isfinite(value)}
        for name in sorted(set(metrics) - set(finite)):
            self.counts["non_finite"] += 1
            if name not in self.non_finite:
                self.non_finite.add(name)
                logger.warning("prime platform: metric {!r} = {} at step {} is not finite: not sent (strict JSON "
                               "has no NaN); further non-finite values of it are dropped quietly", name,
                               metrics[name], step)  # fmt: skip
        if not finite:
            return
        with self._cond:
            row = self._rows.setdefault(step, {})
            row.update(finite)
            while len(self._rows) > KEEP_ROWS:
                self._rows.popitem(last=False)
            if step not in self._queued_steps:  # else the queued upload sends the row as it is by then
                self._enqueue(Upload(step, row=row))

    def log_samples(self, step: int, samples: list[Sample]) -> bool:
        if not samples or (
            self._last_samples_step is not None and step < self._last_samples_step + SAMPLES_EVERY_STEPS
        ):
            return False
        self._last_samples_step = step
        with self._cond:
            self._enqueue(Upload(step, samples=list(samples)))
        return True

    def close(self, exit_code: int = 0) -> None:
        """Send what is queued, for at most ``drain_s``; drop and count the rest; log the tally. The client
        stays open: it belongs to whoever marks the run's end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.drain_s)
        if self._thread.is_alive():
            self._give_up.set()  # cuts retries and their pauses short
            self._thread.join(GIVE_UP_S)
        with self._cond:
            for upload in self._queue:
                self.counts[f"dropped_at_close_{upload.kind}"] += 1
            self._queue.clear()
            if self._thread.is_alive():  # a request the platform does not answer: left to its timeout
                self.counts["dropped_at_close_in_flight"] += 1
        self._report()

    def _enqueue(self, upload: Upload) -> None:
        """Called holding the lock."""
        if self._closing:
            return
        if len(self._queue) >= self.queue_size:
            self.counts[f"dropped_queue_full_{upload.kind}"] += 1
            if self.counts[f"dropped_queue_full_{upload.kind}"] == 1:
                logger.warning("prime platform: {} uploads are waiting (the platform is not keeping up): dropping "
                               "new ones, counted", len(self._queue))  # fmt: skip
            return
        if upload.row is not None:
            self._queued_steps.add(upload.step)
        self._queue.append(upload)
        self._cond.notify()

    def _next(self) -> tuple[Upload, dict[str, float]] | None:
        """The next upload and the metrics to send for it (the row as it is now); None once closed and empty."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            upload = self._queue.popleft()
            if upload.row is not None:  # a report of this step from now on queues a resend
                self._queued_steps.discard(upload.step)
            metrics = dict(upload.row or {})
        return upload, metrics

    def _run(self) -> None:
        while (taken := self._next()) is not None:
            upload, metrics = taken
            if self.refused is not None or self._give_up.is_set():
                why = "refused" if self.refused is not None else "at_close"
                self.counts[f"dropped_{why}_{upload.kind}"] += 1
                continue
            try:
                retrying(self.retry_budget_s, self._give_up, on_retry=self._on_retry)(self._send, upload, metrics)
            except PlatformHTTPError as exc:
                self._on_failure(upload, exc)
            except ImportError as exc:  # samples need pyarrow; metrics go on without it
                self.counts[f"dropped_failed_{upload.kind}"] += 1
                logger.warning("prime platform: samples need pyarrow ({}): pip install 'rlbus[monitor]'", exc)
            except (ValueError, TypeError) as exc:  # samples that will not encode: lose them, never the stream
                self.counts[f"dropped_failed_{upload.kind}"] += 1
                logger.warning("prime platform: could not encode the samples of step {}: {}", upload.step, exc)
            else:
                self.counts[f"{upload.kind}_sent"] += 1
                if self._outage:
                    self._outage = False
                    logger.info("prime platform: reachable again")

    def _send(self, upload: Upload, metrics: dict[str, float]) -> None:
        if upload.row is not None:
            self.client.post_metrics(self.run_id, {**metrics, "step": upload.step, "_timestamp": time.time()})
        else:
            self.client.upload_samples(self.run_id, upload.step, samples_parquet(upload.samples, self.run_id,
                                                                                 upload.step))  # fmt: skip

    def _on_retry(self, state: tenacity.RetryCallState) -> None:
        self.counts["retries"] += 1
        if not self._outage:
            self._outage = True
            error = state.outcome.exception() if state.outcome is not None else None
            logger.warning("prime platform: {}; trying again with backoff for up to {:g}s per upload", error,
                           self.retry_budget_s)  # fmt: skip

    def _on_failure(self, upload: Upload, exc: PlatformHTTPError) -> None:
        if exc.status in (401, 403):
            self.refused = str(exc)
            self.counts[f"dropped_refused_{upload.kind}"] += 1
            logger.error("prime platform: {}. Nothing more is sent for this run", exc)
            return
        self.counts[f"dropped_failed_{upload.kind}"] += 1
        logger.warning("prime platform: dropped the {} of step {}: {}", upload.kind, upload.step, exc)

    def _report(self) -> None:
        dropped = {
            key.removeprefix("dropped_"): n for key, n in sorted(self.counts.items()) if key.startswith("dropped_")
        }
        sent = f"sent {self.counts['metrics_sent']} metrics rows and {self.counts['samples_sent']} sample uploads"
        retried = f", {self.counts['retries']} retries"
        if dropped:
            logger.warning("prime platform: {}{}; dropped {} ({})", sent, retried, sum(dropped.values()),
                           ", ".join(f"{why} {n}" for why, n in dropped.items()))  # fmt: skip
        else:
            logger.info("prime platform: {}{}; nothing dropped", sent, retried)
