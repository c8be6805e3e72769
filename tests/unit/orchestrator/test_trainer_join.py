"""A run's orchestrator on a shared trainer: RunJoin until answered, again when the trainer comes
back, RunLeave when done, a refusal is fatal; against a fake trainer ROUTER on real sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq
from loguru import logger

from rlbus.bus import Bus
from rlbus.config.base import BusConfig, BusEndpoints
from rlbus.messages import Ack, Refused, RunJoin, RunJoined, RunLeave
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.service import EXIT_REFUSED, OrchestratorService
from rlbus.services.orchestrator.trainer_join import TOKEN_FILE, RunRefused, TrainerJoin, run_token
from tests.conftest import free_tcp_port

from .fakes import stub_loader

DEADLINE_S = 20.0  # generous on a loaded machine; a hang still fails
SPEC = {"lora": {"rank": 4}, "optimizer": {"lr": 0.01}, "max_steps": 3}


def bus_config(request_timeout_s: float = 30.0) -> BusConfig:
    endpoints = BusEndpoints(**{name: f"tcp://127.0.0.1:{free_tcp_port()}" for name in BusEndpoints.model_fields})
    return BusConfig(endpoints=endpoints, linger_ms=0, request_timeout_s=request_timeout_s)


def make_config(tmp_path, bus: BusConfig, run_id: str = "run-a") -> OrchestratorConfig:
    shared = {"runs_address": bus.endpoints.trainer_runs, "run_id": run_id, "spec": dict(SPEC)}
    return OrchestratorConfig(batch_size=2, rollouts_per_example=2, seq_len=64, max_steps=3, output_dir=tmp_path,
                              train={"env": [{"id": "a"}]}, bus=bus, shared_trainer=shared)  # fmt: skip


class FakeTrainer:
    """The shared trainer's runs ROUTER, answered by the test."""

    def __init__(self, config: BusConfig) -> None:
        self.bus = Bus(config)
        self.sock = self.bus.bind(zmq.ROUTER, config.endpoints.trainer_runs, "runs")

    def receive(self, pump: Callable[[], None]) -> tuple[bytes, RunJoin | RunLeave]:
        """The next request, pumping the orchestrator's side until it comes."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            pump()
            received = self.bus.recv_before(self.sock, time.monotonic() + 0.02, (RunJoin, RunLeave))
            if received is not None:
                return received
        raise AssertionError("no request reached the fake trainer")

    def close(self) -> None:
        self.bus.close()


@pytest.fixture
def joining(tmp_path) -> Iterator[Callable[..., tuple[TrainerJoin, FakeTrainer, Callable[[], None]]]]:
    opened: list[Bus | FakeTrainer] = []

    def make(request_timeout_s: float = 30.0) -> tuple[TrainerJoin, FakeTrainer, Callable[[], None]]:
        config = make_config(tmp_path, bus_config(request_timeout_s))
        trainer = FakeTrainer(config.bus)
        bus = Bus(config.bus)
        opened.extend([trainer, bus])
        join = TrainerJoin(bus, config, config.shared_trainer)
        poller = zmq.Poller()
        for sock in join.sockets:
            poller.register(sock, zmq.POLLIN)

        def pump() -> None:
            join.handle(dict(poller.poll(20)), time.monotonic())

        join.start(time.monotonic())
        return join, trainer, pump

    yield make
    for thing in opened:
        thing.close()


def pump_until(pump: Callable[[], None], done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        pump()


def test_the_token_is_made_once_and_kept_across_restarts(tmp_path):
    token = run_token(tmp_path)
    assert len(token) == 32 and run_token(tmp_path) == token
    assert (tmp_path / TOKEN_FILE).stat().st_mode & 0o777 == 0o600


def test_a_token_file_rlbus_did_not_write_is_refused_by_name(tmp_path):
    (tmp_path / TOKEN_FILE).write_text("not-hex\n")
    with pytest.raises(ValueError, match="not a run token"):
        run_token(tmp_path)


def test_join_carries_the_run_and_logs_the_trainers_step(joining):
    join, trainer, pump = joining()
    identity, request = trainer.receive(pump)
    config_endpoints = join.bus.config.endpoints
    assert isinstance(request, RunJoin) and request.run_id == "run-a" and request.token == join.token
    assert request.spec == {**SPEC, "run_id": "run-a"}
    assert (request.batches_address, request.monitor_address) == (
        config_endpoints.orchestrator_batches, config_endpoints.monitor_telemetry)  # fmt: skip
    trainer.bus.send(trainer.sock, RunJoined(run_id="run-a", nonce=request.nonce, step=4), identity)
    pump_until(pump, lambda: join.joined)
    assert join.trainer_step == 4 and join.next_deadline() is None


def test_an_unanswered_join_is_sent_again_after_the_request_timeout(joining):
    join, trainer, pump = joining(request_timeout_s=0.3)
    _, first = trainer.receive(pump)
    identity, again = trainer.receive(pump)  # the first went unanswered
    assert isinstance(again, RunJoin) and again.nonce == first.nonce and not join.joined
    trainer.bus.send(trainer.sock, RunJoined(run_id="run-a", nonce=again.nonce, step=0), identity)
    pump_until(pump, lambda: join.joined)


def test_an_answer_to_another_nonce_or_run_is_not_taken(joining):
    join, trainer, pump = joining()
    identity, request = trainer.receive(pump)
    trainer.bus.send(trainer.sock, RunJoined(run_id="run-b", nonce=request.nonce, step=9), identity)
    trainer.bus.send(trainer.sock, RunJoined(run_id="run-a", nonce="old", step=9), identity)
    trainer.bus.send(trainer.sock, RunJoined(run_id="run-a", nonce=request.nonce, step=2), identity)
    pump_until(pump, lambda: join.joined)
    assert join.trainer_step == 2


def test_a_refusal_is_fatal_with_the_trainers_reason(joining):
    _, trainer, pump = joining()
    identity, _ = trainer.receive(pump)
    trainer.bus.send(trainer.sock, Refused(request="RunJoin", reason="run id 'run-a' is held by another run"),
                     identity)  # fmt: skip
    with pytest.raises(RunRefused, match="refused run 'run-a': run id 'run-a' is held by another run"):
        pump_until(pump, lambda: False)


def test_a_trainer_that_comes_back_gets_a_new_join(joining):
    join, trainer, pump = joining()
    identity, request = trainer.receive(pump)
    trainer.bus.send(trainer.sock, RunJoined(run_id="run-a", nonce=request.nonce, step=1), identity)
    pump_until(pump, lambda: join.joined)
    trainer.close()  # the trainer restarts on the same address
    restarted = FakeTrainer(join.bus.config)
    try:
        identity, rejoin = restarted.receive(pump)
        assert isinstance(rejoin, RunJoin) and rejoin.nonce != request.nonce and rejoin.token == join.token
        restarted.bus.send(restarted.sock, RunJoined(run_id="run-a", nonce=rejoin.nonce, step=1), identity)
        pump_until(pump, lambda: join.joined)
    finally:
        restarted.close()


def test_leave_is_acknowledged(joining):
    join, trainer, pump = joining()
    identity, request = trainer.receive(pump)
    trainer.bus.send(trainer.sock, RunJoined(run_id="run-a", nonce=request.nonce, step=3), identity)
    pump_until(pump, lambda: join.joined)
    # leave() waits for its answer: the fake trainer answers from a thread, as its own process would.

    def answer() -> None:
        sender, leave = trainer.bus.recv(trainer.sock, DEADLINE_S, RunLeave)
        assert leave.token == join.token and leave.run_id == "run-a"
        trainer.bus.send(trainer.sock, Ack(ref=leave.nonce), sender)

    thread = threading.Thread(target=answer)
    thread.start()
    assert join.leave()
    thread.join(DEADLINE_S)


def test_leave_gives_up_when_no_trainer_answers(joining):
    join, trainer, _ = joining(request_timeout_s=0.1)
    trainer.close()
    warnings: list[str] = []
    handler = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        assert not join.leave()
    finally:
        logger.remove(handler)
    assert any("giving up leaving the shared trainer" in line for line in warnings), warnings


def test_the_service_exits_with_the_refusal(tmp_path):
    config = make_config(tmp_path, bus_config())
    trainer = FakeTrainer(config.bus)
    try:
        service = OrchestratorService(config, env_loader=stub_loader({"a": 10}))

        def refuse() -> None:
            identity, _ = trainer.bus.recv(trainer.sock, DEADLINE_S, RunJoin)
            trainer.bus.send(trainer.sock, Refused(request="RunJoin", reason="spec: lora.rank must be > 0"), identity)

        thread = threading.Thread(target=refuse)
        thread.start()
        assert service.run() == EXIT_REFUSED
        thread.join(DEADLINE_S)
    finally:
        trainer.close()
