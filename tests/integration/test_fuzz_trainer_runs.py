"""Fuzz the shared trainer's runs ROUTER (``trainer_runs``: ``RunJoin``/``RunLeave``), then join a run for real.

A real :class:`SharedLoop` (tiny model, two run slots) serves the socket. First thousands of
malformed frames (tests/integration/fuzz_frames.py) hit it while its loop runs in a thread: each is
rejected, counted under the ``runs`` role and answered with a ``Refused``. Then well-formed
messages with hostile values (a garbage spec, rank 0 or a rank past the layers' width, unknown
keys, run ids of 10k characters or with '/', '..', NUL; addresses that are not ZeroMQ addresses
or lead nowhere; leaves with another run's token) are each answered with a ``Refused`` naming what
was wrong, and leave no run behind. Through all of it a fake orchestrator still joins and trains.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from rlbus.bus import Bus
from rlbus.codec import decode
from rlbus.messages import Ack, Refused, RunJoin, RunJoined, RunLeave
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.shared_loop import SharedLoop
from tests.conftest import free_tcp_port
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture)
from tests.unit.trainer.test_shared_loop import FakeOrchestrator, drive, shared_trainer, spec, trainer_config

from .fuzz_frames import NUM_EXAMPLES, SocketFuzzer, decode_oracle, malformed_frames

pytestmark = pytest.mark.slow
TIMEOUT_S = 60.0
MAX_FRAMES = 64
GOOD_SPEC = spec(1e-2, 1)


class LoopThread(threading.Thread):
    """``SharedLoop.run`` in a thread; after :meth:`finish` its sockets belong to the test thread
    again (a zmq socket may change threads, never be used by two at once)."""

    def __init__(self, loop: SharedLoop) -> None:
        super().__init__(name="shared-loop", daemon=True)
        self.loop = loop
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.loop.run(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish() in the test thread
            self.error = exc

    def finish(self) -> None:
        self.stop_event.set()
        self.join(TIMEOUT_S)
        assert not self.is_alive() and self.error is None, self.error


@pytest.fixture
def config(tiny_model_dir, tmp_path) -> TrainerConfig:  # noqa: F811
    config = trainer_config(tiny_model_dir, tmp_path)
    config.bus.max_frames = MAX_FRAMES  # "too many frames" stays cheap to send
    return config


@pytest.fixture
def loop(config) -> Iterator[SharedLoop]:
    with shared_trainer(config) as loop:
        yield loop


def replies_to(sock: zmq.Socket, wait_s: float) -> list[Any]:
    """Every reply queued on the fuzzer's socket, decoded as Refused (raises on anything else)."""
    replies = []
    while sock.poll(int(wait_s * 1000)):
        replies.append(decode(sock.recv_multipart(), (Refused,)))
    return replies


def train_one_step(loop: SharedLoop, bus: Bus) -> None:
    """A well-formed run joins, trains its step and leaves, as in tests/unit/trainer/test_shared_loop.py."""
    good = FakeOrchestrator(bus, loop, "good", "g" * 8)
    joined = good.join(GOOD_SPEC)
    assert isinstance(joined, RunJoined) and joined.step == 0, joined
    drive(loop, (good,), lambda: len(good.acks) == 1)
    assert good.acked_steps() == [(1, True)]
    assert isinstance(good.request(RunLeave(run_id="good", token="g" * 8, nonce="bye")), Ack)
    assert loop.table.runs() == []


def test_fuzzed_runs_router_rejects_everything_and_a_run_still_trains(loop, config):
    expected = (RunJoin, RunLeave)
    thread = LoopThread(loop)
    thread.start()
    fuzzer = SocketFuzzer(zmq.DEALER, loop.router.address, decode_oracle(expected, loop.bus._limits))
    try:
        num_sent = fuzzer.run_until_counted(
            malformed_frames(expected, MAX_FRAMES), lambda: loop.bus.stats.decode_errors["runs"], "trainer runs"
        )
        assert thread.is_alive(), thread.error
        replies = replies_to(fuzzer.sock, wait_s=1.0)
    finally:
        fuzzer.close()
        thread.finish()
    assert num_sent >= NUM_EXAMPLES // 2, f"only {num_sent} of {NUM_EXAMPLES} examples reached the socket"
    assert loop.bus.stats.decode_errors["runs"] == num_sent
    # Each rejection is answered (those past the fuzzer's unread queue are dropped, not waited on).
    assert replies and all(isinstance(reply, Refused) and reply.reason for reply in replies)
    assert len(dict(loop.bus.stats.rejected_reasons)) >= 6, loop.bus.stats.rejected_reasons
    assert loop.table.runs() == [] and loop.channels == {}
    with Bus(config.bus) as bus:
        train_one_step(loop, bus)


def hostile_joins() -> list[tuple[str, dict[str, Any], str]]:
    """(run id, RunJoin fields, what the Refused must say): well-formed joins with hostile values."""
    return [
        ("h1", {"spec": {"lora": "garbage", "max_steps": "soon"}}, "bad spec"),
        ("h2", {"spec": spec(1e-2, 1, lora={"rank": 0})}, "lora.rank"),
        ("h3", {"spec": {**GOOD_SPEC, "colour": "red"}}, "colour\n  Extra inputs are not permitted"),
        ("h4", {"spec": spec(1e-2, 1, lora={"rank": 4, "dropout": 2.0, "shape": []})}, "lora.dropout"),
        ("h5", {"spec": spec(1e-2, 1, lora={"rank": 2**63})}, f"lora.rank {2**63} is more than"),
        ("h6", {"spec": spec(1e-2, 1, optimizer={"lr": float("nan")})}, "optimizer.lr"),
        ("h7", {"spec": {**GOOD_SPEC, "run_id": "other"}}, "the spec is of run 'other'"),
        ("x" * 10_000, {}, "more than 64"),
        ("a/b", {}, "no '.', '/'"),
        ("..", {}, "no '.', '/'"),
        ("a\x00b", {}, "use only letters"),
        ("", {}, "it is empty"),
        ("h8", {"batches_address": "not a zeromq address"}, "cannot connect to batches_address 'not a zeromq address'"),
        ("h9", {"batches_address": "ipc:///" + "d/" * 200}, "cannot connect to batches_address"),
        ("h10", {"batches_address": "udp://127.0.0.1:9"}, "cannot connect"),
        ("h11", {"monitor_address": "tcp://*:1"}, "monitor_address 'tcp://*:1'"),
        ("good", {"token": "another token"}, "another orchestrator (another run token)"),
    ]


def test_hostile_values_on_the_runs_router_are_refused_with_the_reason(loop, config):
    nowhere = f"tcp://127.0.0.1:{free_tcp_port()}"  # nothing listens: zmq keeps trying, the join cannot tell
    with Bus(config.bus) as bus:
        good = FakeOrchestrator(bus, loop, "good", "g" * 8)
        assert isinstance(good.join(spec(1e-2, 10_000)), RunJoined)  # trains on while the others knock
        hostile = FakeOrchestrator(bus, loop, "hostile", "h" * 8)
        for run_id, fields, reason in hostile_joins():
            join = RunJoin(**{"run_id": run_id, "token": "h" * 8, "spec": GOOD_SPEC, "nonce": f"n-{run_id[:8]}",
                              "batches_address": hostile.batches.address, **fields})  # fmt: skip
            refused = hostile.request(join, (good,))
            assert isinstance(refused, Refused) and refused.request == "RunJoin", (run_id[:20], refused)
            assert reason in refused.reason and len(refused.reason) < 1000, (run_id[:20], refused.reason)
        assert [run.run_id for run in loop.table.runs()] == ["good"]
        # A join whose batch ROUTER is nowhere cannot be told apart from a slow orchestrator: it
        # joins and holds the second slot until it leaves; meanwhile a third run is refused.
        stray = RunJoin(run_id="stray", token="s" * 8, spec=GOOD_SPEC, batches_address=nowhere, nonce="n0")
        assert isinstance(hostile.request(stray, (good,)), RunJoined)
        third = RunJoin(run_id="third", token="t" * 8, spec=GOOD_SPEC, batches_address=nowhere, nonce="n1")
        full = hostile.request(third, (good,))
        assert isinstance(full, Refused) and "max_concurrent_runs = 2 runs are active" in full.reason, full

        others_leave = hostile.request(RunLeave(run_id="good", token="h" * 8, nonce="n-leave"), (good,))
        assert isinstance(others_leave, Refused) and "not yours to end" in others_leave.reason
        # Leaving a run that is not here is acknowledged: the orchestrator resends its leave until
        # answered, and a resent leave must not be refused once the first one freed the slot.
        assert isinstance(hostile.request(RunLeave(run_id="ghost", token="h" * 8, nonce="n-ghost"), (good,)), Ack)
        assert isinstance(hostile.request(RunLeave(run_id="stray", token="s" * 8, nonce="n-stray"), (good,)), Ack)
        assert [run.run_id for run in loop.table.runs()] == ["good"]

        trained = len(good.acks)
        drive(loop, (good,), lambda: len(good.acks) >= trained + 2)
        assert good.acked_steps() == [(step, True) for step in range(1, len(good.acks) + 1)]
        assert loop.bus.stats.decode_errors["runs"] == 0  # well-formed, so refused by the loop, not the codec
