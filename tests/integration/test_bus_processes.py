"""The bus between real processes: fan-out to workers, and a worker killed mid-stream."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import zmq

from rlbus.bus import Bus, BusTimeout, PeerUnreachable
from rlbus.config.base import BusConfig
from rlbus.messages import Ack, Hello, RolloutResult, RolloutTask, SamplingParams

pytestmark = pytest.mark.slow

# Spawned interpreters import numpy, zmq and pydantic first: allow for a slow start.
STARTUP_S = 60


def stream_acks(address: str, worker_id: str) -> None:
    """Worker: greet, then stream numbered Acks until killed (blocking at the HWM)."""
    with Bus(BusConfig(send_hwm=20, linger_ms=0)) as bus:
        sock = bus.connect(zmq.DEALER, address, role="results")
        bus.send(sock, Hello(sender=worker_id))
        for i in itertools.count():
            bus.send(sock, Ack(ref=f"{worker_id}:{i}"))


def roll_out(tasks_address: str, results_address: str, worker_id: str) -> None:
    """Worker: answer every task with an (empty) result until killed."""
    with Bus(BusConfig(linger_ms=1000)) as bus:
        tasks = bus.connect(zmq.PULL, tasks_address, role="tasks")
        results = bus.connect(zmq.PUSH, results_address, role="results")
        bus.send(results, Hello(sender=worker_id))
        while True:
            task = bus.recv(tasks, STARTUP_S, RolloutTask, what="rollout tasks")
            result = RolloutResult(task_id=task.task_id, worker_id=worker_id, env_id=task.env_id,
                                   example_id=task.example_id, rollouts=[])  # fmt: skip
            bus.send(results, result)


@pytest.fixture
def start_process() -> Iterator[Callable[..., multiprocessing.Process]]:
    """``start_process(target, *args)`` in a spawned process, killed at teardown."""
    context = multiprocessing.get_context("spawn")
    processes: list[multiprocessing.Process] = []

    def start(target: Callable[..., None], *args: str) -> multiprocessing.Process:
        process = context.Process(target=target, args=args, daemon=True)
        process.start()
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
        process.join(10)


def test_fan_out_to_worker_processes_delivers_each_task_once(bus, endpoint, start_process, watch_handshakes):
    tasks = bus.bind(zmq.PUSH, endpoint("tasks"), role="tasks")
    results = bus.bind(zmq.PULL, endpoint("results"), role="results")
    watcher = watch_handshakes(tasks)
    for i in range(3):
        start_process(roll_out, tasks.address, results.address, f"env-worker-{i}")
    greeted = {bus.recv(results, STARTUP_S, Hello, what="worker greetings").sender for _ in range(3)}
    assert greeted == {f"env-worker-{i}" for i in range(3)}
    watcher.wait(3, STARTUP_S)  # every worker's task socket is connected too

    for i in range(90):
        task = RolloutTask(task_id=f"t{i}", env_id="math", example_id=i, num_rollouts=4, sampling=SamplingParams(),
                           lease_s=60, issued_at=time.time())  # fmt: skip
        bus.send(tasks, task)
    done = [bus.recv(results, 10, RolloutResult, what="rollout results") for _ in range(90)]
    assert sorted(r.example_id for r in done) == list(range(90))
    assert all(r.task_id == f"t{r.example_id}" for r in done)
    assert Counter(r.worker_id for r in done) == {f"env-worker-{i}": 30 for i in range(3)}
    with pytest.raises(BusTimeout):
        bus.recv(results, 0.2)


def _drain_until_timeout(bus: Bus, sock: zmq.Socket, what: str) -> tuple[list[str], BusTimeout]:
    refs = []
    while True:
        try:
            refs.append(bus.recv(sock, 1.0, Ack, what=what)[1].ref)
        except BusTimeout as exc:
            return refs, exc


def _send_until_unreachable(bus: Bus, sock: zmq.Socket, identity: bytes, timeout_s: float) -> bool:
    # libzmq removes a dead peer's route asynchronously, during later socket calls.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            bus.send(sock, Ack(ref="late"), identity=identity)
        except PeerUnreachable:
            return True
        sock.poll(20)
    return False


def test_worker_killed_mid_stream_then_a_new_one_takes_over(bus, endpoint, start_process):
    router = bus.bind(zmq.ROUTER, endpoint("results"), role="results")
    first = start_process(stream_acks, router.address, "w1")
    first_identity, hello = bus.recv(router, STARTUP_S, Hello, what="Hello from w1")
    assert hello.sender == "w1"
    received = [bus.recv(router, 10, Ack)[1].ref for _ in range(20)]
    assert received == [f"w1:{i}" for i in range(20)]

    os.kill(first.pid, signal.SIGKILL)
    first.join(10)
    assert first.exitcode == -signal.SIGKILL
    # What was in flight still arrives, in order; then the stream stops with a clear timeout.
    drained, timeout = _drain_until_timeout(bus, router, what="results from env-worker w1")
    assert received + drained == [f"w1:{i}" for i in range(20 + len(drained))]
    assert "results from env-worker w1" in str(timeout) and router.address in str(timeout)
    assert _send_until_unreachable(bus, router, first_identity, timeout_s=10)

    start_process(stream_acks, router.address, "w2")
    second_identity, hello = bus.recv(router, STARTUP_S, Hello, what="Hello from w2")
    assert hello.sender == "w2" and second_identity != first_identity
    assert [bus.recv(router, 10, Ack)[1].ref for _ in range(20)] == [f"w2:{i}" for i in range(20)]
    assert bus.stats.decode_errors == {}
