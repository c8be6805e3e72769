"""Replica metrics for the monitor: throughput and queue lengths from vLLM's own counters.

vLLM's API server keeps Prometheus metrics in-process (the ``/metrics`` route
serves the same registry), so reading the registry costs no HTTP round trip
and counts exactly what the engine scheduled.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rlbus.services.inference.policy import LoadReport

# Prometheus family name -> our metric name (families drop the ``_total`` suffix).
ENGINE_GAUGES = {
    "vllm:num_requests_running": "inference/requests_running",
    "vllm:num_requests_waiting": "inference/requests_waiting",
}
GENERATION_TOKENS = "vllm:generation_tokens"
PROMPT_TOKENS = "vllm:prompt_tokens"


def read_engine_samples(families: Iterable[Any] | None = None) -> dict[str, float]:
    """Sum of each vLLM family we use over its label sets (engines, models)."""
    if families is None:
        from prometheus_client import REGISTRY

        families = REGISTRY.collect()
    wanted = {*ENGINE_GAUGES, GENERATION_TOKENS, PROMPT_TOKENS}
    totals: dict[str, float] = {}
    for family in families:
        if family.name not in wanted:
            continue
        for sample in family.samples:
            # Counters also expose ``_created`` timestamps; only the value counts.
            if sample.name in (family.name, family.name + "_total"):
                totals[family.name] = totals.get(family.name, 0.0) + sample.value
    return totals


class ThroughputMeter:
    """Tokens per second between two consecutive readings of the engine's counters."""

    def __init__(self) -> None:
        self._last: tuple[float, float, float] | None = None

    def update(self, samples: dict[str, float], now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        generated, prompted = samples.get(GENERATION_TOKENS, 0.0), samples.get(PROMPT_TOKENS, 0.0)
        metrics = {ours: samples[theirs] for theirs, ours in ENGINE_GAUGES.items() if theirs in samples}
        if self._last is not None and now > self._last[0]:
            elapsed = now - self._last[0]
            metrics["inference/tokens_per_s"] = (generated - self._last[1]) / elapsed
            metrics["inference/prompt_tokens_per_s"] = (prompted - self._last[2]) / elapsed
        self._last = (now, generated, prompted)
        return metrics


def weight_update_metrics(report: LoadReport) -> dict[str, float]:
    """Time and bandwidth of one weight update."""
    return {
        "inference/weight_update_s": report.seconds,
        "inference/weight_fetch_s": report.fetch_s,
        "inference/weight_load_s": report.load_s,
        "inference/weight_update_mb": report.num_bytes / 1e6,
        "inference/weight_update_mb_per_s": report.mb_per_s,
        # Where the step came from: peer replicas' relays or the trainer (summed over tensor-parallel ranks).
        "inference/weight_relay_mb": report.relay_bytes / 1e6,
        "inference/weight_trainer_mb": report.trainer_bytes / 1e6,
        # Or from the trainer's broadcast to the weight group (weight_transport = "collective").
        "inference/weight_broadcast_mb": report.broadcast_bytes / 1e6,
    }
