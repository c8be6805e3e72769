"""Two trainer ranks under torchrun (FSDP2, gloo) train like one rank on the same batch.

The fake orchestrator gives rank r the micro-batches r, r + 2, ... of each step; a
single rank gets them all. Losses of both steps must match (the second step
depends on the first update, so gradients were summed right), and the weights
rank 0 serves after gathering the shards must equal the single rank's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
import zmq

from rlbus.bus import Bus, BusTimeout
from rlbus.config.base import BusConfig, write_toml
from rlbus.messages import BatchRequest, TrainBatch
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.service import run_trainer
from rlbus.weights import fetch_step, query_latest
from tests.conftest import free_tcp_port
from tests.integration.test_trainer_service import endpoints
from tests.integration.trainer_fakes import FakeMonitor, FakeOrchestrator
from tests.unit.trainer.batches import train_batch
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
STEPS = 3
TIMEOUT_S = 600


class Shares:
    """Serves each rank its share of steps 1-2; step 3 is held back until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, request: BatchRequest) -> list[TrainBatch]:
        if request.step == STEPS and not self.release.is_set():
            return []
        return [train_batch(request.step, request.rank, request.world_size, num_micro_batches=4)]


def config(model_dir, output_dir) -> TrainerConfig:
    bus = BusConfig(endpoints=endpoints(), request_timeout_s=1, heartbeat_interval_s=0.5, linger_ms=2000)
    return TrainerConfig(model=str(model_dir), output_dir=output_dir, max_steps=STEPS, bus=bus, peak_flops=1e11,
                         optimizer={"lr": 1e-3})  # fmt: skip


def fetch_latest(config: TrainerConfig, step: int, alive: Callable[[], bool]) -> dict[str, np.ndarray]:
    """Weights of ``step`` from the running trainer, as an inference replica gets them."""
    with Bus(BusConfig(linger_ms=0)) as bus:
        sock = bus.connect(zmq.DEALER, config.bus.endpoints.trainer_weights, "weights-client")
        deadline = time.monotonic() + TIMEOUT_S
        while alive() and time.monotonic() < deadline:  # ask until step ``step`` is published
            try:
                latest = query_latest(bus, sock, "test", timeout_s=5)
            except BusTimeout:  # not bound yet (the model is loading)
                continue
            if latest is not None and latest.step == step:
                return {name: array.copy() for name, array, _ in fetch_step(bus, sock, latest, "test", TIMEOUT_S)}
            bus.recv_before(sock, time.monotonic() + 0.5, None)  # a bounded pause between queries
    raise AssertionError(f"step {step} was never published (trainer alive: {alive()})")


def run(config: TrainerConfig, command: list[str] | None) -> tuple[dict, dict[str, np.ndarray]]:
    """Losses per step and the weights served after step 2, from one run."""
    shares = Shares()
    with FakeMonitor(config.bus.endpoints.monitor_telemetry) as monitor, \
            FakeOrchestrator(config.bus.endpoints.orchestrator_batches, shares):  # fmt: skip
        if command is None:
            thread = threading.Thread(target=run_trainer, args=(config,))
            thread.start()
            weights = fetch_latest(config, STEPS - 1, thread.is_alive)
            shares.release.set()
            thread.join(TIMEOUT_S)
        else:
            process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                weights = fetch_latest(config, STEPS - 1, lambda: process.poll() is None)
                shares.release.set()
                assert process.wait(TIMEOUT_S) == 0
            finally:
                process.kill()
                process.wait()
        metrics = monitor.wait_for_metrics(STEPS)
    return {step: m["loss/mean"] for step, m in metrics.items()}, weights


def test_two_ranks_match_one_rank(tiny_model_dir, tmp_path):  # noqa: F811
    one = config(tiny_model_dir, tmp_path / "one")
    one_losses, one_weights = run(one, None)

    two = config(tiny_model_dir, tmp_path / "two")
    path = write_toml(two, tmp_path / "two.toml")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_tcp_port()), "-m", "rlbus", "trainer", "@", str(path)]  # fmt: skip
    two_losses, two_weights = run(two, command)

    assert sorted(one_losses) == sorted(two_losses) == [1, 2, 3]
    for step in one_losses:
        assert two_losses[step] == pytest.approx(one_losses[step], rel=1e-5, abs=1e-7), step
    assert list(two_weights) == list(one_weights)
    for name, array in one_weights.items():
        torch.testing.assert_close(torch.from_numpy(two_weights[name]), torch.from_numpy(array), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "two/logs/trainer/rank_1.log").exists()
