"""The shared trainer's loop (``max_concurrent_runs``) over real ZeroMQ sockets: runs join with a
RunJoin, their batches are pulled from fake orchestrators, each run trains its own adapter."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from rlbus.bus import Bus
from rlbus.messages import (
    Ack,
    BatchAck,
    BatchRequest,
    MetricsReport,
    Refused,
    RunJoin,
    RunJoined,
    RunLeave,
    TrainBatch,
    WeightsAnnounced,
)
from rlbus.pubsub import Subscriber
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.model import load_model
from rlbus.services.trainer.multi_run import RunTable, StepSettings
from rlbus.services.trainer.shared_loop import SharedLoop
from rlbus.services.trainer.shared_loop_runs import RunCheckpoints
from tests.conftest import free_tcp_port
from tests.unit.trainer.batches import train_batch
from tests.unit.trainer.test_lora import SOLO

DEADLINE_S = 30.0
"""Also the request timeout, except where resends are tested: a resend on a slow machine would make
the orchestrator send a batch twice, and the acks then count a duplicate."""


def spec(lr: float, max_steps: int, **overrides: Any) -> dict[str, Any]:
    return {"lora": {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
            "optimizer": {"lr": lr}, "max_steps": max_steps, **overrides}  # fmt: skip


def trainer_config(model_dir: Path, output_dir: Path, **overrides: Any) -> TrainerConfig:
    ports = {name: f"tcp://127.0.0.1:{free_tcp_port()}"
             for name in ("trainer_runs", "trainer_weights", "trainer_announce", "monitor_telemetry")}  # fmt: skip
    values = {"model": str(model_dir), "output_dir": output_dir, "max_concurrent_runs": 2, "peak_flops": 1e11,
              "ckpt": {"enabled": True, "interval": 1},
              "bus": {"endpoints": ports, "linger_ms": 0, "request_timeout_s": DEADLINE_S}}  # fmt: skip
    return TrainerConfig(**{**values, **overrides})


@contextmanager
def shared_trainer(config: TrainerConfig) -> Iterator[SharedLoop]:
    table = RunTable(load_model(config.model, "float32", torch.device("cpu")), 2, StepSettings(SOLO, 1e11))
    with Bus(config.bus) as bus:
        loop = SharedLoop(config, bus, table)
        try:
            yield loop
        finally:
            loop.close()


class FakeOrchestrator:
    """One run's orchestrator: joins the trainer and serves ``train_batch(step, seed)`` per request
    (an empty, bad batch on ``bad_steps``), keeping every ack it gets."""

    def __init__(self, bus: Bus, loop: SharedLoop, run_id: str, token: str, seed: int = 0,
                 bad_steps: tuple[int, ...] = ()) -> None:  # fmt: skip
        self.bus, self.loop, self.run_id, self.token = bus, loop, run_id, token
        self.seed, self.bad_steps = seed, bad_steps
        self.batches = bus.bind(zmq.ROUTER, "tcp://127.0.0.1:*", f"batches-{run_id}")
        self.monitor = bus.bind(zmq.PULL, "tcp://127.0.0.1:*", f"monitor-{run_id}")
        self.runs = bus.connect(zmq.DEALER, loop.router.address, "runs")
        self.acks: list[BatchAck] = []
        self.requested: list[int] = []
        self.last_step_served: int | None = None
        """Requests for later steps go unanswered (an orchestrator still collecting rollouts)."""
        self.metrics: list[MetricsReport] = []

    def request(self, message: RunJoin | RunLeave, others: tuple[FakeOrchestrator, ...] = ()) -> Any:
        """Send ``message`` and serve everyone until the trainer answers it."""
        self.bus.send(self.runs, message)
        replies: list[Any] = []

        def answered() -> bool:
            replies.extend(self._reply())
            return bool(replies)

        drive(self.loop, (self, *others), answered)
        return replies[0]

    def join(self, spec: dict[str, Any], others: tuple[FakeOrchestrator, ...] = ()) -> RunJoined | Refused:
        join = RunJoin(run_id=self.run_id, token=self.token, spec=spec, batches_address=self.batches.address,
                       monitor_address=self.monitor.address, nonce=f"join-{time.monotonic()}")  # fmt: skip
        reply = self.request(join, others)
        assert isinstance(reply, Refused) or reply.nonce == join.nonce
        return reply

    def serve(self) -> None:
        while received := self.bus.recv_before(self.batches, time.monotonic(), (BatchRequest, BatchAck)):
            identity, message = received
            if isinstance(message, BatchAck):
                self.acks.append(message)
                continue
            self.requested.append(message.step)
            if self.last_step_served is not None and message.step > self.last_step_served:
                continue
            if message.step in self.bad_steps:
                self.bus.send(self.batches, TrainBatch(step=message.step, rank=0, world_size=1, micro_batches=[],
                                                       num_loss_tokens=1), identity)  # fmt: skip
            else:
                self.bus.send(self.batches, train_batch(message.step, seed=self.seed), identity)
        while (report := self.bus.recv_before(self.monitor, time.monotonic(), None)) is not None:
            if isinstance(report, MetricsReport):
                self.metrics.append(report)

    def acked_steps(self) -> list[tuple[int, bool]]:
        return [(ack.step, ack.ok) for ack in self.acks]

    def _reply(self) -> list[Any]:
        reply = self.bus.recv_before(self.runs, time.monotonic(), (RunJoined, Refused, Ack))
        return [] if reply is None else [reply]

    def kill(self) -> None:
        for sock in (self.batches, self.monitor, self.runs):
            sock.close(linger=0)


def drive(loop: SharedLoop, orchestrators: tuple[FakeOrchestrator, ...], done: Callable[[], bool]) -> None:
    """Run the trainer's loop and the orchestrators in turn until ``done``; fail after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, "the shared trainer did not get there in time"
        loop.poll_once(0.01)
        for orchestrator in orchestrators:
            if not orchestrator.batches.closed:
                orchestrator.serve()


def test_two_runs_train_contiguous_steps_with_their_own_rates_and_adapters(tiny_model_dir, tmp_path):
    config = trainer_config(tiny_model_dir, tmp_path)
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        announced = Subscriber(bus, config.bus.endpoints.trainer_announce)
        announced.wait_ready(10)
        alpha, beta = FakeOrchestrator(bus, loop, "alpha", "a" * 8), FakeOrchestrator(bus, loop, "beta", "b" * 8, 1)
        checkpoints = tmp_path / "runs" / "alpha" / "checkpoints"
        assert alpha.join(spec(1e-2, 3), (beta,)).step == 0
        assert beta.join(spec(3e-2, 3), (alpha,)).step == 0
        drive(loop, (alpha, beta), lambda: len(alpha.acks) == 3 and len(beta.acks) == 3 and len(beta.metrics) == 3)
        assert alpha.acked_steps() == beta.acked_steps() == [(1, True), (2, True), (3, True)]
        assert {r.replica_id for r in alpha.metrics} == {"trainer-alpha"}
        assert [r.metrics["optim/lr"] for r in alpha.metrics] == [1e-2] * 3
        assert [r.metrics["optim/lr"] for r in beta.metrics] == [3e-2] * 3
        published = set()
        while (message := bus.recv_before(announced.sock, time.monotonic() + 0.2, WeightsAnnounced)) is not None:
            published.add((message.lora.name, message.step))
        assert {("alpha", 0), ("alpha", 3), ("beta", 0), ("beta", 3)} <= published
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_3"]  # the newest two
        assert isinstance(alpha.request(RunLeave(run_id="alpha", token="a" * 8, nonce="bye")), Ack)
        assert [p.run_id for p in loop.table.runs()] == ["beta"]


def test_a_step_is_acknowledged_only_once_checkpointed(tiny_model_dir, tmp_path, monkeypatch):
    config = trainer_config(tiny_model_dir, tmp_path)
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        alpha = FakeOrchestrator(bus, loop, "alpha", "a" * 8)
        alpha.join(spec(1e-2, 3))
        drive(loop, (alpha,), lambda: len(alpha.acks) == 1)
        save = loop.table.save

        def disk_full(run_id: str, folder: Path, recheck_base: bool = False) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(loop.table, "save", disk_full)
        with pytest.raises(OSError, match="disk full"):
            drive(loop, (alpha,), lambda: False)
        monkeypatch.setattr(loop.table, "save", save)
        alpha.serve()  # whatever the trainer sent before failing has arrived by now (loopback, same process)
        assert alpha.acked_steps() == [(1, True)]


def test_a_bad_batch_of_one_run_is_rejected_while_the_other_trains(tiny_model_dir, tmp_path):
    config = trainer_config(tiny_model_dir, tmp_path)
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        alpha = FakeOrchestrator(bus, loop, "alpha", "a" * 8, bad_steps=(2,))
        beta = FakeOrchestrator(bus, loop, "beta", "b" * 8)
        alpha.join(spec(1e-2, 3), (beta,))
        beta.join(spec(1e-2, 3), (alpha,))
        drive(loop, (alpha, beta), lambda: len(alpha.acks) == 3 and len(beta.acks) == 3)
        assert alpha.acked_steps() == [(1, True), (2, False), (3, True)]
        assert "no micro-batches" in alpha.acks[1].reason
        assert beta.acked_steps() == [(1, True), (2, True), (3, True)]


def test_a_restarted_orchestrator_keeps_its_step_and_a_gone_one_stalls_no_other_run(tiny_model_dir, tmp_path):
    config = trainer_config(tiny_model_dir, tmp_path)
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        alpha, beta = FakeOrchestrator(bus, loop, "alpha", "a" * 8), FakeOrchestrator(bus, loop, "beta", "b" * 8)
        alpha.last_step_served = 2
        alpha.join(spec(1e-2, 4), (beta,))
        beta.join(spec(1e-2, 4), (alpha,))
        drive(loop, (alpha, beta), lambda: len(alpha.acks) == 2 and 3 in alpha.requested)
        alpha.kill()  # SIGKILL-like: its batch ROUTER is gone while the trainer asks it for step 3
        drive(loop, (beta,), lambda: len(beta.acks) == 4)
        assert beta.acked_steps() == [(step, True) for step in range(1, 5)]
        restarted = FakeOrchestrator(bus, loop, "alpha", "a" * 8)
        assert restarted.join(spec(1e-2, 4)).step == 2
        drive(loop, (restarted,), lambda: len(restarted.acks) == 2)
        assert restarted.acked_steps() == [(3, True), (4, True)]
        intruder = FakeOrchestrator(bus, loop, "alpha", "c" * 8)
        refused = intruder.join(spec(1e-2, 4))
        assert isinstance(refused, Refused) and refused.request == "RunJoin"
        assert "already training here" in refused.reason and "another run token" in refused.reason


def test_an_unanswered_batch_request_is_sent_again(tiny_model_dir, tmp_path):
    config = trainer_config(tiny_model_dir, tmp_path)
    config.bus.request_timeout_s = 0.2
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        alpha = FakeOrchestrator(bus, loop, "alpha", "a" * 8)
        alpha.last_step_served = 0  # still collecting the rollouts of step 1
        alpha.join(spec(1e-2, 3))
        drive(loop, (alpha,), lambda: alpha.requested.count(1) >= 3)
        alpha.last_step_served = None
        drive(loop, (alpha,), lambda: (1, True) in alpha.acked_steps())


@pytest.mark.parametrize(("run_id", "overrides", "reason"), [
    ("alpha", {"lora": {"rank": 0}}, "rank"),
    ("alpha", {"lora": {"target_modules": ["nope_proj"]}}, "['nope_proj'] match no linear layer"),
    ("a.b", {}, "cannot name an adapter and a folder"),
    ("alpha", {"optimizer": {"lr": -1}}, "optimizer.lr"),
    # Above the narrowest targeted layer's width (v_proj: 64) a rank only costs memory; a huge one
    # would exhaust the trainer's memory for every run.
    ("alpha", {"lora": {"rank": 65, "target_modules": ["q_proj", "v_proj"]}}, "lora.rank 65 is more than 64"),
    ("alpha", {"lora": {"rank": 2**40}}, f"lora.rank {2**40} is more than"),
    ("x" * 10_000, {}, "... (10002 characters)"),
])  # fmt: skip
def test_a_bad_spec_is_refused_with_the_reason(tiny_model_dir, tmp_path, run_id, overrides, reason):
    config = trainer_config(tiny_model_dir, tmp_path)
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        refused = FakeOrchestrator(bus, loop, run_id, "a" * 8).join(spec(1e-2, 3, **overrides))
        assert isinstance(refused, Refused) and reason in refused.reason, refused
        assert len(refused.reason) < 1000  # a peer's 10k-character run id is not echoed back whole
        assert loop.table.runs() == []
        # The refusal left nothing behind: a good spec under the same name joins.
        assert FakeOrchestrator(bus, loop, "alpha", "a" * 8).join(spec(1e-2, 3)).step == 0


def test_a_restarted_trainer_resumes_each_run_from_its_checkpoint(tiny_model_dir, tmp_path):
    config = trainer_config(tiny_model_dir, tmp_path)
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        alpha = FakeOrchestrator(bus, loop, "alpha", "a" * 8)
        alpha.join(spec(1e-2, 4))
        drive(loop, (alpha,), lambda: len(alpha.acks) == 2)
        trained = loop.table.adapter_tensors("alpha")
    with shared_trainer(trainer_config(tiny_model_dir, tmp_path)) as loop, Bus(config.bus) as bus:
        refused = FakeOrchestrator(bus, loop, "alpha", "c" * 8).join(spec(1e-2, 4))
        assert isinstance(refused, Refused) and "already names another run" in refused.reason
        alpha = FakeOrchestrator(bus, loop, "alpha", "a" * 8)
        assert alpha.join(spec(1e-2, 4)).step == 2
        resumed = loop.table.adapter_tensors("alpha")
        assert all(torch.equal(resumed[name], tensor) for name, tensor in trained.items())
        drive(loop, (alpha,), lambda: len(alpha.acks) == 2)
        assert alpha.acked_steps() == [(3, True), (4, True)]


def test_a_damaged_checkpoint_refuses_its_run_only(tiny_model_dir, tmp_path):
    config = trainer_config(tiny_model_dir, tmp_path)
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        alpha = FakeOrchestrator(bus, loop, "alpha", "a" * 8)
        alpha.join(spec(1e-2, 4))
        drive(loop, (alpha,), lambda: len(alpha.acks) == 1)
    (tmp_path / "runs" / "alpha" / "checkpoints" / "step_1" / "run_state.pt").write_bytes(b"torn write")
    with shared_trainer(trainer_config(tiny_model_dir, tmp_path)) as loop, Bus(config.bus) as bus:
        refused = FakeOrchestrator(bus, loop, "alpha", "a" * 8).join(spec(1e-2, 4))
        assert isinstance(refused, Refused) and "cannot resume from" in refused.reason and "step_1" in refused.reason
        assert FakeOrchestrator(bus, loop, "beta", "b" * 8).join(spec(1e-2, 4)).step == 0
        assert [p.run_id for p in loop.table.runs()] == ["beta"]


@pytest.mark.parametrize(("overrides", "named"), [
    ({"lora": {}}, "remove [trainer.lora]"),
    ({"max_steps": 5}, "max_steps means nothing"),
    ({"num_ranks": 2}, "num_ranks = 2"),
    ({"memory": {"ac": 1}}, "memory.ac"),
])  # fmt: skip
def test_a_shared_trainer_refuses_settings_that_belong_to_one_run(overrides, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        TrainerConfig(max_concurrent_runs=2, **overrides)
    TrainerConfig(**overrides)  # each is fine for a single-run trainer


def test_a_run_idle_past_the_limit_gives_its_slot_to_a_joining_run(tiny_model_dir, tmp_path):
    config = trainer_config(tiny_model_dir, tmp_path, run_idle_evict_s=3600)
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        alpha, beta = FakeOrchestrator(bus, loop, "alpha", "a" * 8), FakeOrchestrator(bus, loop, "beta", "b" * 8)
        alpha.last_step_served = 1
        alpha.join(spec(1e-2, 4), (beta,))
        beta.join(spec(1e-2, 1000), (alpha,))  # served all along: never idle
        drive(loop, (alpha, beta), lambda: len(alpha.acks) == 1 and 2 in alpha.requested)
        alpha.kill()  # killed for good: it never sends RunLeave
        gamma = FakeOrchestrator(bus, loop, "gamma", "c" * 8)
        refused = gamma.join(spec(1e-2, 2), (beta,))  # alpha idle for less than an hour: no slot
        assert isinstance(refused, Refused) and sorted(loop.channels) == ["alpha", "beta"]
        loop.config.run_idle_evict_s = 0.3
        drive(loop, (beta,), lambda: time.monotonic() - loop.channels["alpha"].asked_at > 0.3)
        joined = gamma.join(spec(1e-2, 2), (beta,))
        assert isinstance(joined, RunJoined) and joined.step == 0
        assert sorted(loop.channels) == ["beta", "gamma"]
        assert RunCheckpoints(tmp_path, "alpha").steps() == [1]  # kept: a re-join resumes from it
        drive(loop, (beta, gamma), lambda: len(gamma.acks) == 2)
        assert gamma.acked_steps() == [(1, True), (2, True)]
        assert all(ok for _, ok in beta.acked_steps())


def test_without_an_idle_limit_a_full_trainer_refuses_a_new_run(tiny_model_dir, tmp_path):
    config = trainer_config(tiny_model_dir, tmp_path, run_idle_evict_s=None)
    with shared_trainer(config) as loop, Bus(config.bus) as bus:
        alpha, beta = FakeOrchestrator(bus, loop, "alpha", "a" * 8), FakeOrchestrator(bus, loop, "beta", "b" * 8)
        alpha.join(spec(1e-2, 4), (beta,))
        beta.join(spec(1e-2, 4), (alpha,))
        alpha.kill()
        refused = FakeOrchestrator(bus, loop, "gamma", "c" * 8).join(spec(1e-2, 2), (beta,))
        assert isinstance(refused, Refused) and sorted(loop.channels) == ["alpha", "beta"]
