"""``rlbus trainer`` against a fake orchestrator and monitor over real sockets."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from rlbus.config import write_toml
from rlbus.config.base import BusConfig, BusEndpoints
from rlbus.messages import BatchRequest, Refused, TrainBatch
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.service import run_trainer
from tests.conftest import free_tcp_port
from tests.integration.trainer_fakes import FakeMonitor, FakeOrchestrator
from tests.unit.trainer.batches import train_batch
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow


def endpoints() -> BusEndpoints:
    ports = iter(free_tcp_port() for _ in range(4))
    return BusEndpoints(orchestrator_batches=f"tcp://127.0.0.1:{next(ports)}",
                        trainer_weights=f"tcp://127.0.0.1:{next(ports)}",
                        trainer_announce=f"tcp://127.0.0.1:{next(ports)}",
                        monitor_telemetry=f"tcp://127.0.0.1:{next(ports)}")  # fmt: skip


def nan_advantages(batch: TrainBatch) -> TrainBatch:
    micro = batch.micro_batches[0]
    micro.advantages = np.where(np.arange(micro.advantages.size) == 7, np.nan, micro.advantages).astype(np.float32)
    return batch


def ragged(batch: TrainBatch) -> TrainBatch:
    micro = batch.micro_batches[0]
    micro.advantages = np.append(micro.advantages, 1.0).astype(np.float32)
    return batch


class Script:
    """Step 1: first request unanswered. Step 2: a duplicate of step 1 comes first. Step 3: a NaN
    advantage in one sample. Step 4: arrays of different lengths (untrainable)."""

    def __init__(self) -> None:
        self.num_step1_requests = 0

    def __call__(self, request: BatchRequest) -> list[TrainBatch]:
        step = request.step
        if step == 1:
            self.num_step1_requests += 1
            return [] if self.num_step1_requests == 1 else [train_batch(1)]
        if step == 2:
            return [train_batch(1), train_batch(2)]
        if step == 3:
            return [nan_advantages(train_batch(3))]
        if step == 4:
            return [ragged(train_batch(4))]
        return [train_batch(step)]


def test_trains_acks_skips_duplicates_drops_bad_samples_and_survives_a_bad_batch(tiny_model_dir, tmp_path):  # noqa: F811
    bus = BusConfig(endpoints=endpoints(), request_timeout_s=5, heartbeat_interval_s=0.5, linger_ms=2000)
    config = TrainerConfig(model=str(tiny_model_dir), output_dir=tmp_path, max_steps=5, bus=bus, peak_flops=1e11,
                           optimizer={"lr": 1e-3})  # fmt: skip
    with FakeMonitor(bus.endpoints.monitor_telemetry) as monitor, \
            FakeOrchestrator(bus.endpoints.orchestrator_batches, Script()) as orchestrator:  # fmt: skip
        assert run_trainer(config) == 0
        metrics = monitor.wait_for_metrics(steps=4)
    acks = [(a.step, a.ok, a.reason.split(":")[0]) for a in orchestrator.acks]
    assert acks[:2] == [(1, True, ""), (1, True, "duplicate")]
    assert acks[2] == (2, True, "")
    assert acks[3] == (3, True, "")  # the sample with a NaN advantage was dropped, the rest trained
    assert acks[4][:2] == (4, False)
    assert "micro-batch 0: arrays must be 1-D of one length" in orchestrator.acks[4].reason
    assert acks[5] == (5, True, "")
    assert [r.step for r in orchestrator.requests] == [1, 1, 2, 3, 4, 5]  # step 1 asked again after the timeout
    assert all((r.rank, r.world_size, r.trainer_id) == (0, 1, "trainer") for r in orchestrator.requests)
    assert sorted(metrics) == [1, 2, 3, 5]  # the rejected step trained nothing
    for name in ("loss/mean", "entropy/mean", "mismatch_kl/mean", "mismatch_kl/max", "masked_advantage_positive/mean",
                 "optim/lr", "optim/grad_norm", "perf/throughput", "perf/mfu", "perf/peak_memory", "time/step",
                 "time/wait_for_batch", "time/forward_backward", "time/broadcast_weights", "time/save_ckpt"):
        assert name in metrics[5], name
    assert metrics[1]["time/wait_for_batch"] >= 5.0  # it waited out the unanswered first request, then asked again
    assert metrics[3]["batches/dropped_samples"] == 1 and math.isfinite(metrics[3]["loss/mean"])
    assert metrics[5]["batches/rejected"] == 1 and metrics[5]["batches/duplicates"] == 1
    events = [m for m in monitor.messages if type(m).__name__ == "Event"]
    assert {"bad_samples", "bad_batch", "finished"} <= {m.kind for m in events}
    (dropped,) = [m for m in events if m.kind == "bad_samples"]
    assert "micro-batch 0: 1 sample(s) dropped: advantages [nan] (1 value(s)) not finite" in dropped.message


def test_refusal_naming_the_next_step_moves_the_trainer_there(tiny_model_dir, tmp_path):  # noqa: F811
    """A trainer resumed from an older checkpoint than the orchestrator's goes on where the orchestrator is:
    the typed ``next_step`` says where, whatever the reason's wording."""

    def batch_for(request: BatchRequest) -> list:
        if request.step < 3:
            return [Refused(request="BatchRequest", reason="trained already", next_step=3)]
        return [train_batch(request.step)]

    bus = BusConfig(endpoints=endpoints(), request_timeout_s=5, linger_ms=2000)
    config = TrainerConfig(model=str(tiny_model_dir), output_dir=tmp_path, max_steps=3, bus=bus, peak_flops=1e11)
    with FakeMonitor(bus.endpoints.monitor_telemetry) as monitor, \
            FakeOrchestrator(bus.endpoints.orchestrator_batches, batch_for) as orchestrator:  # fmt: skip
        assert run_trainer(config) == 0
        metrics = monitor.wait_for_metrics(steps=1)
    assert [r.step for r in orchestrator.requests] == [1, 3]
    assert [(a.step, a.ok) for a in orchestrator.acks] == [(3, True)]
    assert sorted(metrics) == [3]


def test_sigterm_stops_the_trainer_with_a_log_line_and_exit_143(tiny_model_dir, tmp_path):  # noqa: F811
    """What the launcher sends on stop: the trainer says so in its log, closes its sockets, exits 128 + 15."""
    bus = BusConfig(endpoints=endpoints(), request_timeout_s=5, heartbeat_interval_s=0.5, linger_ms=0)
    config = TrainerConfig(model=str(tiny_model_dir), output_dir=tmp_path, max_steps=3, bus=bus, peak_flops=1e11)
    config_path = write_toml(config, tmp_path / "trainer.toml")
    asked = threading.Event()

    def no_batch(_request: BatchRequest) -> list:
        asked.set()  # the trainer is in its loop, waiting for a batch
        return []

    with FakeMonitor(bus.endpoints.monitor_telemetry), FakeOrchestrator(bus.endpoints.orchestrator_batches, no_batch), \
            (tmp_path / "trainer.out").open("wb") as output:  # fmt: skip
        trainer = subprocess.Popen([sys.executable, "-m", "rlbus", "trainer", "@", str(config_path)],
                                   stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            assert asked.wait(180), "the trainer never asked for a batch"
            trainer.send_signal(signal.SIGTERM)
            trainer.wait(timeout=60)
        finally:
            trainer.kill()
    assert trainer.returncode == 128 + signal.SIGTERM, (tmp_path / "trainer.out").read_text()[-2000:]
    assert "trainer got SIGTERM: stopped" in (tmp_path / "logs" / "trainer.log").read_text()
