"""The collective weight transport across real processes: a trainer-side broadcaster (this process)
and two replica processes (tests/integration/collective_replica.py), with gloo on CPUs and the same
code with NCCL where three GPUs are present.

One run walks through: a group that cannot form (one replica missing: the step goes over the bus),
broadcast steps arriving bit-exact, a broadcast that does not match its announcement (refused,
fetched over the bus), a replica that stops answering (the broadcast times out within the configured
timeout, every replica still gets the step) and the next group generation forming afterwards.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Iterator

import msgspec
import numpy as np
import pytest

from rlbus.bus import Bus
from rlbus.config import BusConfig
from rlbus.weights import WeightServer, WeightStore
from tests.conftest import free_tcp_port
from tests.integration.collective_replica import arrays_digest, run_replica

torch = pytest.importorskip("torch")

from rlbus.services.trainer.weight_broadcast import WeightBroadcaster, publish_step

pytestmark = pytest.mark.slow
TIMEOUT_S = 4.0
"""The group's timeout: forming, and each bucket's broadcast."""
DEADLINE_S = 90.0
"""How long a replica may take to report one step (process start and torch import included)."""


def backends() -> list:
    nccl_skip = "NCCL needs 3 CUDA devices (trainer + 2 replicas, one GPU each)"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["gloo", pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(gpus < 3, reason=nccl_skip)])]


def model(step: int) -> list[tuple[str, np.ndarray, str]]:
    """A small model whose every tensor changes with ``step``: float32, bfloat16 bits, odd sizes."""
    rng = np.random.default_rng(step)
    return [
        ("embed.weight", rng.standard_normal((96, 64), dtype=np.float32), "float32"),
        ("layer.0.weight", rng.standard_normal((64, 64), dtype=np.float32), "float32"),
        ("layer.0.bias", rng.standard_normal(7, dtype=np.float32), "float32"),
        ("norm.weight", rng.integers(0, 2**16, 333, dtype=np.uint16), "bfloat16"),
        ("head.weight", rng.standard_normal((50, 64), dtype=np.float32), "float32"),
    ]


class Replicas:
    def __init__(self, backend: str, address: str, fetch_address: str) -> None:
        self.context = mp.get_context("spawn")
        self.backend, self.address, self.fetch_address = backend, address, fetch_address
        # A queue each way per replica: a process stopped (SIGSTOP) while it holds a shared queue's
        # lock would block the other replica's reports.
        self.inboxes: dict[int, mp.Queue] = {}
        self.outboxes: dict[int, mp.Queue] = {}
        self.processes: dict[int, mp.Process] = {}

    def start(self, rank: int) -> None:
        settings = {"address": self.address, "rank": rank, "size": 3, "backend": self.backend, "timeout_s": TIMEOUT_S}
        self.inboxes[rank], self.outboxes[rank] = self.context.Queue(), self.context.Queue()
        process = self.context.Process(target=run_replica, daemon=True,
                                       args=(settings, self.fetch_address, self.inboxes[rank], self.outboxes[rank]))  # fmt: skip
        process.start()
        self.processes[rank] = process
        assert self.outboxes[rank].get(timeout=DEADLINE_S) == ("started", rank)

    def announce(self, announced, ranks: list[int]) -> None:
        for rank in ranks:
            self.inboxes[rank].put(msgspec.to_builtins(announced))

    def results(self, ranks: tuple[int, ...] | list[int]) -> dict[int, tuple]:
        """The next step result of each of ``ranks``: (step, path, digest, group) by rank."""
        found = {}
        for rank in ranks:
            got_rank, *rest = self.outboxes[rank].get(timeout=DEADLINE_S)
            assert got_rank == rank
            found[rank] = tuple(rest)
        return found

    def close(self) -> None:
        for rank, process in self.processes.items():
            if process.is_alive():
                os.kill(process.pid, signal.SIGCONT)
                self.inboxes[rank].put(None)
        for process in self.processes.values():
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


@pytest.fixture
def trainer() -> Iterator[tuple[WeightServer, Callable[[str], WeightBroadcaster]]]:
    bus = Bus(BusConfig(request_timeout_s=5))
    server = WeightServer(bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", WeightStore(bucket_bytes=20_000)).start()
    made: list[WeightBroadcaster] = []

    def broadcaster(backend: str) -> WeightBroadcaster:
        made.append(WeightBroadcaster(f"127.0.0.1:{free_tcp_port()}", 2, backend, TIMEOUT_S).start())
        return made[-1]

    yield server, broadcaster
    for each in made:
        each.stop()
    server.stop()
    bus.close()


def wait_for_group(broadcaster: WeightBroadcaster, other_than: str = "") -> str:
    deadline = time.monotonic() + DEADLINE_S
    while (group := broadcaster.ready_group()) in ("", other_than):
        assert time.monotonic() < deadline, "the weight group did not form"
        time.sleep(0.05)  # polled with a deadline: the group forms on the broadcaster's thread
    return group


def publish(server: WeightServer, broadcaster: WeightBroadcaster, replicas: Replicas, step: int,
            ranks: tuple[int, ...] = (1, 2)) -> tuple[str, dict[int, tuple]]:  # fmt: skip
    tensors = model(step)
    announced = publish_step(server, broadcaster, step, tensors)
    replicas.announce(announced, ranks)
    return arrays_digest(tensors), replicas.results(ranks)


@pytest.mark.parametrize("backend", backends())
def test_broadcast_steps_fallbacks_and_regrouping(trainer, backend):
    server, make_broadcaster = trainer
    if backend == "nccl":
        torch.cuda.set_device(0)
    broadcaster = make_broadcaster(backend)
    replicas = Replicas(backend, broadcaster.address, server.fetch_address)
    try:
        # Replica 2 is not up: no group forms, step 1 is announced without one and fetched over the bus.
        replicas.start(1)
        want, got = publish(server, broadcaster, replicas, 1, (1,))
        assert got == {1: (1, "bus", want, "")}

        replicas.start(2)
        group = wait_for_group(broadcaster)
        for step in (2, 3, 4):
            want, got = publish(server, broadcaster, replicas, step)
            assert got == {rank: (step, "collective", want, group) for rank in (1, 2)}
            assert broadcaster.wait_idle(DEADLINE_S)
        assert broadcaster.num_broadcasts == 3

        # A broadcast that is not the announced step: refused by checksum, the exact step comes by bus.
        tampered = [(name, array + 1 if name == "layer.0.bias" else array) for name, array, _ in model(5)]
        original_submit = broadcaster.submit
        broadcaster.submit = lambda announced, arrays: original_submit(announced, dict(tampered))  # type: ignore[method-assign]
        want, got = publish(server, broadcaster, replicas, 5)
        broadcaster.submit = original_submit  # type: ignore[method-assign]
        assert got == {rank: (5, "bus", want, group) for rank in (1, 2)}
        assert broadcaster.wait_idle(DEADLINE_S) and broadcaster.num_failures == 0

        # Replica 2 stops answering: the broadcast times out, the group is dropped, both get step 6.
        os.kill(replicas.processes[2].pid, signal.SIGSTOP)
        started = time.monotonic()
        tensors = model(6)
        announced = publish_step(server, broadcaster, 6, tensors)
        assert announced.broadcast_group == group
        assert broadcaster.wait_idle(DEADLINE_S)
        assert time.monotonic() - started < TIMEOUT_S * 3
        assert broadcaster.num_failures == 1 and broadcaster.ready_group() != group
        replicas.announce(announced, [1, 2])
        assert replicas.results([1])[1][::2] == (6, arrays_digest(tensors))  # over either path, exact
        os.kill(replicas.processes[2].pid, signal.SIGCONT)
        assert replicas.results([2])[2][::2] == (6, arrays_digest(tensors))

        # The next generation forms with both replicas, and broadcasts go out again.
        new_group = wait_for_group(broadcaster, other_than=group)
        want, got = publish(server, broadcaster, replicas, 7)
        assert got == {rank: (7, "collective", want, new_group) for rank in (1, 2)}
    finally:
        replicas.close()
