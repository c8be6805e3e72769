"""Env-workers on real ZeroMQ sockets against a small fake orchestrator (a real ROUTER).

Inference is scripted (see conftest): these tests are about the task channel —
credit, exactly-once processing, acknowledgement, resending, reconnection.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import msgspec
import zmq
from loguru import logger

from rlbus.abus import AsyncBus
from rlbus.config.base import BusConfig, BusEndpoints
from rlbus.environments import Environment, RolloutState, Rubric
from rlbus.messages import (
    Event,
    Heartbeat,
    MetricsReport,
    ResultAck,
    RolloutResult,
    RolloutTask,
    SamplingParams,
    TaskRequest,
)  # fmt: skip
from rlbus.services.env_worker.config import EnvWorkerConfig
from rlbus.services.env_worker.rollout import RolloutRunner
from rlbus.services.env_worker.service import EnvironmentCache, EnvWorker
from rlbus.services.env_worker.tokens import TurnRenderer
from tests.conftest import free_tcp_port

DEADLINE_S = 120.0  # generous: a loaded 2-core machine


class CountingEnvironment(Environment):
    """Counts how often each example is scored, and can hold rollouts until released."""

    def __init__(self, num_examples: int) -> None:
        super().__init__([{"prompt": f"task {i}", "answer": i} for i in range(num_examples)], Rubric([self.seen]))
        self.scored: Counter[int] = Counter()
        self.gate: asyncio.Event | None = None

    async def setup(self, state: RolloutState) -> None:
        if self.gate is not None:
            await self.gate.wait()

    def seen(self, answer: int) -> float:
        self.scored[answer] += 1
        return 1.0


def worker_config(endpoint: str, name: str, monitor: str | None = None, **fields: Any) -> EnvWorkerConfig:
    monitor = monitor or f"tcp://127.0.0.1:{free_tcp_port()}"
    bus = BusConfig(endpoints=BusEndpoints(orchestrator_tasks=endpoint, monitor_telemetry=monitor),
                    linger_ms=0, heartbeat_interval_s=0.5)  # fmt: skip
    return EnvWorkerConfig(worker_id=name, bus=bus, max_concurrent_tasks=2, **fields)


def make_worker(config: EnvWorkerConfig, env: Environment, sampler: Any, renderer: TurnRenderer) -> EnvWorker:
    runner = RolloutRunner(sampler, renderer, env_timeout_s=60)
    return EnvWorker(config, runner, AsyncBus(config.bus), EnvironmentCache(lambda env_id, args: env))


def rollout_task(number: int, num_rollouts: int = 2) -> RolloutTask:
    return RolloutTask(
        task_id=f"t{number}", env_id="counting", example_id=number, num_rollouts=num_rollouts,
        sampling=SamplingParams(max_tokens=8), lease_s=600, issued_at=time.time(),
    )  # fmt: skip


class FakeOrchestrator:
    """Hands tasks out by credit and answers results, recording everything. ``ack`` says how to answer
    a result: True acknowledges it, False leaves it unanswered, a ``ResultAck`` is sent as it is."""

    def __init__(self, endpoint: str, tasks: list[RolloutTask],
                 ack: Callable[[RolloutResult], bool | ResultAck] = lambda r: True):  # fmt: skip
        self.bus = AsyncBus(BusConfig(linger_ms=0))
        self.router = self.bus.bind(zmq.ROUTER, endpoint, role="tasks")
        self.queue, self.ack = list(tasks), ack
        self.credits: Counter[bytes] = Counter()
        self.outstanding: Counter[bytes] = Counter()
        self.max_outstanding = 0
        self.results: list[RolloutResult] = []
        self.requests: list[TaskRequest] = []

    async def serve_until(self, done: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
        deadline = time.monotonic() + deadline_s
        while not done():
            assert time.monotonic() < deadline, f"only {len(self.results)} results within {deadline_s}s"
            received = await self.bus.recv_before(self.router, time.monotonic() + 0.5, (TaskRequest, RolloutResult))
            if received is None:
                continue
            identity, message = received
            if isinstance(message, TaskRequest):
                self.requests.append(message)
                self.credits[identity] += message.num_tasks
            else:
                self.results.append(message)
                self.outstanding[identity] -= 1
                answer = self.ack(message)
                if answer is True:
                    answer = ResultAck(task_ids=[message.task_id])
                if answer:
                    await self.bus.send(self.router, answer, identity)
            await self.hand_out()

    async def hand_out(self) -> None:
        for identity in list(self.credits):
            while self.queue and self.credits[identity] > 0:
                self.credits[identity] -= 1
                self.outstanding[identity] += 1
                self.max_outstanding = max(self.max_outstanding, self.outstanding[identity])
                await self.bus.send(self.router, self.queue.pop(0), identity)

    def num_keepalives(self) -> int:
        return sum(1 for request in self.requests if request.num_tasks == 0)

    async def serve_keepalives(self, num: int) -> None:
        """Serve until ``num`` more keepalives came: the worker's loop went round for a while."""
        until = self.num_keepalives() + num
        await self.serve_until(lambda: self.num_keepalives() >= until)

    def close(self) -> None:
        self.bus.close()


async def run_workers(workers: list[EnvWorker], until: Any) -> None:
    await run_workers_returning(workers, until)


async def run_workers_returning(workers: list[EnvWorker], until: Any) -> Any:
    runs = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        return await until
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*runs)
        for worker in workers:
            worker.bus.close()


def test_four_workers_process_every_task_exactly_once(scripted, renderer: TurnRenderer) -> None:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    env, num_tasks = CountingEnvironment(40), 40
    orchestrator = FakeOrchestrator(endpoint, [rollout_task(i) for i in range(num_tasks)])
    workers = [make_worker(worker_config(endpoint, f"w{i}"), env, scripted(lambda p, s: "ok"), renderer)
               for i in range(4)]  # fmt: skip
    try:
        asyncio.run(run_workers(workers, orchestrator.serve_until(lambda: len(orchestrator.results) == num_tasks)))
    finally:
        orchestrator.close()
    assert sorted(r.task_id for r in orchestrator.results) == sorted(f"t{i}" for i in range(num_tasks))
    assert env.scored == Counter({i: 2 for i in range(num_tasks)})  # each task run once, both rollouts scored
    assert all(len(r.rollouts) == 2 and r.rollouts[0].error is None for r in orchestrator.results)
    assert {r.worker_id for r in orchestrator.results} <= {"w0", "w1", "w2", "w3"}
    assert orchestrator.max_outstanding <= 2  # credit never exceeded the worker's slots
    assert sum(w.counters["tasks"] for w in workers) == num_tasks
    assert all(not w.unacked for w in workers)


def test_an_unacknowledged_result_is_sent_again_but_not_recomputed(scripted, renderer: TurnRenderer) -> None:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    env = CountingEnvironment(1)
    acks = iter([False, True])
    orchestrator = FakeOrchestrator(endpoint, [rollout_task(0)], ack=lambda result: next(acks))
    worker = make_worker(worker_config(endpoint, "w0", result_ack_timeout_s=0.5), env,
                         scripted(lambda p, s: "ok"), renderer)  # fmt: skip
    try:
        asyncio.run(run_workers([worker], orchestrator.serve_until(lambda: len(orchestrator.results) == 2)))
    finally:
        orchestrator.close()
    assert [r.task_id for r in orchestrator.results] == ["t0", "t0"]
    assert env.scored == Counter({0: 2}) and worker.counters["results_resent"] >= 1
    assert not worker.unacked


async def _until_idle(worker) -> None:
    while worker.running:
        await asyncio.sleep(0.01)


def test_a_restarted_orchestrator_gets_fresh_credit_and_the_pending_result(scripted, renderer: TurnRenderer) -> None:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    env = CountingEnvironment(1)
    worker = make_worker(worker_config(endpoint, "w0"), env, scripted(lambda p, s: "ok"), renderer)

    async def scenario() -> FakeOrchestrator:
        env.gate = asyncio.Event()
        first = FakeOrchestrator(endpoint, [rollout_task(0)])
        await first.serve_until(lambda: worker.running)  # the task is running, held at setup
        first.close()  # the orchestrator dies before the result exists
        env.gate.set()
        await asyncio.wait_for(_until_idle(worker), 30)  # the result exists, unacked: both slots free
        second = FakeOrchestrator(endpoint, [])
        try:
            await second.serve_until(lambda: bool(second.results) and not worker.unacked)
        finally:
            second.close()
        return second

    async def main() -> FakeOrchestrator:
        run = asyncio.create_task(worker.run())
        try:
            return await scenario()
        finally:
            worker.stop()
            await run
            worker.bus.close()

    second = asyncio.run(main())
    assert {r.task_id for r in second.results} == {"t0"} and env.scored == Counter({0: 2})
    # A new connection starts with all free slots. The credit the finished task gave back while no
    # orchestrator was there may be queued in the socket and arrive first: it is not the reconnection's.
    offered = [request.num_tasks for request in second.requests if request.num_tasks > 0]
    assert 2 in offered[:2] and max(offered) == 2, offered


class SocketEvents:
    """Stands in for a socket monitor: hands out queued (event, endpoint) messages."""

    def __init__(self, *events: zmq.Event) -> None:
        self.messages = [[struct.pack("=hi", event, 0), b"tcp://127.0.0.1:1"] for event in events]

    async def poll(self, timeout: int) -> bool:
        return bool(self.messages)

    async def recv_multipart(self) -> list[bytes]:
        return self.messages.pop(0)


def test_losing_the_orchestrator_is_logged_at_info_and_a_new_handshake_reconnects() -> None:
    # Every finished run ends with the orchestrator gone: not a warning (the monitor reports a dead one).
    worker = SimpleNamespace(connected=True, tasks_out=SimpleNamespace(address="tcp://127.0.0.1:1"),
                             connections=SocketEvents(zmq.EVENT_DISCONNECTED))  # fmt: skip
    records: list[Any] = []
    handler = logger.add(lambda message: records.append(message.record), level="DEBUG")
    try:
        assert asyncio.run(EnvWorker.reconnected(worker)) is False and worker.connected is False
    finally:
        logger.remove(handler)
    # Only this worker's records: threads left by earlier tests may log meanwhile.
    lost = [r["level"].name for r in records if "lost the connection to the orchestrator" in r["message"]]
    assert lost == ["INFO"], lost
    worker.connections = SocketEvents(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    assert asyncio.run(EnvWorker.reconnected(worker)) is True and worker.connected is True


def test_bad_frames_and_a_broken_environment_do_not_stop_the_worker(scripted, renderer: TurnRenderer) -> None:
    endpoint, monitor = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    orchestrator = FakeOrchestrator(endpoint, [])
    telemetry = orchestrator.bus.bind(zmq.PULL, monitor, role="telemetry")
    config = worker_config(endpoint, "w0", monitor=monitor)

    def loader(env_id: str, args: dict) -> Environment:
        if env_id == "broken":
            raise ImportError("no module named broken_env")
        return CountingEnvironment(1)

    runner = RolloutRunner(scripted(lambda p, s: "ok"), renderer, env_timeout_s=60)
    worker = EnvWorker(config, runner, AsyncBus(config.bus), EnvironmentCache(loader))
    broken = msgspec.structs.replace(rollout_task(0), task_id="broken", env_id="broken")

    async def scenario() -> MetricsReport:
        await orchestrator.serve_until(lambda: bool(orchestrator.credits))
        identity = next(iter(orchestrator.credits))
        await orchestrator.router.send_multipart([identity, b"garbage", b"more garbage"])
        orchestrator.queue = [broken, rollout_task(0)]
        await orchestrator.hand_out()
        await orchestrator.serve_until(lambda: len(orchestrator.results) == 2)
        while True:  # the next report counts both tasks
            report = await orchestrator.bus.recv(telemetry, DEADLINE_S, (MetricsReport, Heartbeat, Event))
            if isinstance(report, MetricsReport) and report.metrics["env_worker/tasks"] == 2:
                return report

    async def main() -> MetricsReport:
        run = asyncio.create_task(worker.run())
        try:
            return await scenario()
        finally:
            worker.stop()
            await run
            worker.bus.close()

    try:
        report = asyncio.run(main())
    finally:
        orchestrator.close()
    by_id = {r.task_id: r for r in orchestrator.results}
    assert all("cannot load environment 'broken': ImportError: no module named broken_env" in r.error
               for r in by_id["broken"].rollouts)  # fmt: skip
    assert [r.error for r in by_id["t0"].rollouts] == [None, None]
    assert report.metrics["env_worker/errored_rollouts"] == 2 and report.metrics["env_worker/empty_rollouts"] == 0
    assert worker.bus.stats.decode_errors["tasks"] == 1


def test_no_task_is_asked_for_before_an_inference_replica_is_ready(scripted, renderer: TurnRenderer) -> None:
    from rlbus.services.env_worker.inference import InferenceClient
    from tests.unit.env_worker.test_inference import ScriptedServer

    endpoint, server = f"tcp://127.0.0.1:{free_tcp_port()}", ScriptedServer()
    server.health = 503  # vLLM is still starting
    orchestrator = FakeOrchestrator(endpoint, [rollout_task(0)])
    config = worker_config(endpoint, "w0")
    runner = RolloutRunner(scripted(lambda p, s: "ok"), renderer, env_timeout_s=60)
    requests_while_starting: list[TaskRequest] = []

    async def scenario(inference: InferenceClient) -> None:
        try:
            await orchestrator.serve_until(lambda: len(server.requests) >= 3)  # the worker asked /health 3 times
            requests_while_starting.extend(orchestrator.requests)
            server.health = 200
            await orchestrator.serve_until(lambda: len(orchestrator.results) == 1)
        finally:
            await inference.close()

    async def main() -> None:
        inference = InferenceClient([server.url])
        worker = EnvWorker(config, runner, AsyncBus(config.bus),
                           EnvironmentCache(lambda env_id, args: CountingEnvironment(1)), inference=inference)  # fmt: skip
        await run_workers([worker], scenario(inference))

    try:
        asyncio.run(main())
    finally:
        orchestrator.close()
        server.close()
    assert requests_while_starting == []
    assert orchestrator.requests[0].num_tasks == 2 and [r.task_id for r in orchestrator.results] == ["t0"]


def test_a_task_whose_runner_raises_is_answered_errored_and_frees_its_slot(scripted, renderer: TurnRenderer) -> None:
    class Broken(RolloutRunner):
        async def run_task(self, task: RolloutTask, env: Environment) -> list:
            raise RuntimeError("bug in the runner")

    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    orchestrator = FakeOrchestrator(endpoint, [rollout_task(i) for i in range(3)])  # one more than the slots
    config = worker_config(endpoint, "w0")
    runner = Broken(scripted(lambda p, s: "ok"), renderer, env_timeout_s=60)
    environments = EnvironmentCache(lambda env_id, args: CountingEnvironment(3))
    worker = EnvWorker(config, runner, AsyncBus(config.bus), environments)
    try:
        asyncio.run(run_workers([worker], orchestrator.serve_until(lambda: len(orchestrator.results) == 3, 60)))
    finally:
        orchestrator.close()
    assert sorted(r.task_id for r in orchestrator.results) == ["t0", "t1", "t2"]
    assert all(r.error == "the rollouts failed: RuntimeError: bug in the runner" and r.reward == 0.0
               for result in orchestrator.results for r in result.rollouts)  # fmt: skip
    assert worker.counters["errored_rollouts"] == 6 and not worker.running


def test_a_rollout_the_orchestrator_would_refuse_goes_out_errored(scripted, renderer: TurnRenderer) -> None:
    def huge_once(completion: str) -> float:
        return 1e7 if completion == "huge" else 1.0

    replies = iter(["huge", "fine"])
    env = Environment([{"prompt": "p"}], Rubric([huge_once]))
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    orchestrator = FakeOrchestrator(endpoint, [rollout_task(0)])
    worker = make_worker(worker_config(endpoint, "w0"), env, scripted(lambda p, s: next(replies)), renderer)
    try:
        asyncio.run(run_workers([worker], orchestrator.serve_until(lambda: len(orchestrator.results) == 1, 60)))
    finally:
        orchestrator.close()
    (result,) = orchestrator.results
    bad, good = result.rollouts
    assert bad.error == "invalid rollout, not sent: reward is 10000000.0, not a finite number of magnitude at most 1e+06"  # fmt: skip
    assert (bad.reward, bad.turns) == (0.0, []) and (good.error, good.reward) == (None, 1.0)
    assert worker.counters["invalid_rollouts"] == 1 and worker.counters["errored_rollouts"] == 1


def test_a_refused_result_is_dropped_and_never_sent_again(scripted, renderer: TurnRenderer) -> None:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    refusal = ResultAck(task_ids=["t0"], accepted=False, reason="invalid: rollout 0: reward nan is not finite")
    orchestrator = FakeOrchestrator(endpoint, [rollout_task(0)], ack=lambda result: refusal)
    worker = make_worker(worker_config(endpoint, "w0", result_ack_timeout_s=0.2), CountingEnvironment(1),
                         scripted(lambda p, s: "ok"), renderer)  # fmt: skip

    async def scenario() -> None:
        await orchestrator.serve_until(lambda: worker.counters["results_refused"] == 1, 60)
        await orchestrator.serve_keepalives(3)  # over a second: several resend periods pass

    try:
        asyncio.run(run_workers([worker], scenario()))
    finally:
        orchestrator.close()
    assert [r.task_id for r in orchestrator.results] == ["t0"]
    assert not worker.unacked and worker.counters["results_resent"] == 0


def test_a_result_never_answered_is_sent_max_result_sends_times_then_dropped(scripted, renderer: TurnRenderer) -> None:
    endpoint, monitor = f"tcp://127.0.0.1:{free_tcp_port()}", f"tcp://127.0.0.1:{free_tcp_port()}"
    orchestrator = FakeOrchestrator(endpoint, [rollout_task(0)], ack=lambda result: False)
    telemetry = orchestrator.bus.bind(zmq.PULL, monitor, role="telemetry")
    config = worker_config(endpoint, "w0", monitor=monitor, result_ack_timeout_s=0.2, max_result_sends=3)
    worker = make_worker(config, CountingEnvironment(1), scripted(lambda p, s: "ok"), renderer)

    async def scenario() -> Event:
        await orchestrator.serve_until(lambda: len(orchestrator.results) >= 3, 60)
        await orchestrator.serve_keepalives(3)  # time for more resends, were there any
        while True:
            event = await orchestrator.bus.recv(telemetry, DEADLINE_S, (MetricsReport, Heartbeat, Event))
            if isinstance(event, Event) and event.kind == "result_dropped":
                return event

    try:
        event = asyncio.run(run_workers_returning([worker], scenario()))
    finally:
        orchestrator.close()
    assert [r.task_id for r in orchestrator.results] == ["t0"] * 3
    assert event.message == "result of task t0 dropped: sent 3 times, never acknowledged"
    assert not worker.unacked and worker.counters["results_dropped"] == 1
