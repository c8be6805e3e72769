"""The replica's bus side over real sockets, with a fake engine loader (no vLLM).

The test plays trainer (a real WeightServer), orchestrator (ROUTER) and monitor (PULL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest
import zmq

from rlbus.abus import AsyncBus
from rlbus.bus import Bus
from rlbus.config.base import BusEndpoints
from rlbus.messages import (
    Ack,
    Event,
    Heartbeat,
    LoraAdapterMeta,
    MetricsReport,
    PolicyLoaded,
    Refused,
    WeightsAnnounced,
)
from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.policy import LoadReport, policy_ref
from rlbus.services.inference.sync import WeightSync
from rlbus.services.orchestrator.buffer import PolicyGate
from rlbus.weights import WeightServer, WeightStore

WEIGHTS = [("w", np.ones((4, 4), np.float32), "float32")]


def lora(name: str) -> LoraAdapterMeta:
    return LoraAdapterMeta(name=name, rank=2, alpha=4.0, target_modules=["q_proj"])


class FakeLoader:
    """Stands in for the engine: records loads; ``outcomes[step]`` scripts a failure."""

    def __init__(self) -> None:
        self.loaded: list[int] = []
        self.num_reloads = 0
        self.reload_error = ""
        self.outcomes: dict[int, LoadReport] = {}
        self.failures: dict[int, list[LoadReport]] = {}
        """Failures a step meets once each, in order, before it loads."""

    async def load_step(self, announced: WeightsAnnounced) -> LoadReport:
        self.loaded.append(announced.step)
        if self.failures.get(announced.step):
            return self.failures[announced.step].pop(0)
        return self.outcomes.get(announced.step) or LoadReport(
            ok=True, step=announced.step, num_bytes=announced.total_bytes, fetch_s=0.01, load_s=0.01
        )

    async def reload_base(self) -> LoadReport:
        self.num_reloads += 1
        return LoadReport(ok=not self.reload_error, step=0, load_s=0.01, error=self.reload_error, kind="load")

    async def abort_in_flight(self) -> None:
        pytest.fail("nothing is in flight in these tests")

    def engine_dead(self) -> bool:
        return False


class World:
    """Trainer, orchestrator and monitor around one replica."""

    def __init__(self, bus_config, endpoint: Callable[..., str], published: int | None) -> None:
        names = ("trainer_weights", "trainer_announce", "orchestrator_policy", "monitor_telemetry")
        self.endpoints = BusEndpoints(**{name: endpoint(name, fixed=True) for name in names})
        config = bus_config.model_copy(update={"endpoints": self.endpoints, "heartbeat_interval_s": 0.1})
        self.config = InferenceConfig(bus=config, startup_weights_timeout_s=2, port=8123, replica_id="replica-t")
        self.trainer_bus = Bus(config)
        self.trainer = WeightServer(self.trainer_bus, self.endpoints.trainer_weights, self.endpoints.trainer_announce,
                                    WeightStore(bucket_bytes=1 << 20)).start()  # fmt: skip
        if published is not None:
            self.trainer.publish(published, WEIGHTS)
        self.bus = AsyncBus(config)
        self.orchestrator = self.bus.bind(zmq.ROUTER, self.endpoints.orchestrator_policy, "policy")
        self.monitor = self.bus.bind(zmq.PULL, self.endpoints.monitor_telemetry, "telemetry")
        self.loader = FakeLoader()
        self.fatal: list[BaseException] = []
        self.sync = WeightSync(self.config, self.loader, on_fatal=self.fatal.append)

    async def policy_loaded(self, step: int, ack: bool = True, gate: PolicyGate | None = None) -> PolicyLoaded:
        """The next PolicyLoaded for ``step`` (earlier steps' reports are skipped, and fed to ``gate``)."""
        deadline = time.monotonic() + 20
        while (received := await self.bus.recv_before(self.orchestrator, deadline, PolicyLoaded)) is not None:
            identity, report = received
            if gate is not None:
                gate.update(report)
            if report.step == step:
                if ack:
                    await self.bus.send(self.orchestrator, Ack(ref=policy_ref(step)), identity)
                return report
        raise AssertionError(f"no PolicyLoaded for step {step}")

    async def telemetry(self, kind: type, predicate: Callable = lambda m: True):
        deadline = time.monotonic() + 20
        while (message := await self.bus.recv_before(self.monitor, deadline, None)) is not None:
            if isinstance(message, kind) and predicate(message):
                return message
        raise AssertionError(f"no matching {kind.__name__}")

    async def close(self) -> None:
        await self.sync.stop()
        self.trainer.stop()
        self.trainer_bus.close()
        self.bus.close()


def run(bus_config, endpoint, scenario, published: int | None = None):
    async def main():
        world = World(bus_config, endpoint, published)
        try:
            return await asyncio.wait_for(scenario(world), 30)
        finally:
            await world.close()

    return asyncio.run(main())


async def until(predicate: Callable[[], bool]) -> None:
    """Let the replica's loops run until ``predicate`` holds (the caller's wait_for bounds it)."""
    while not predicate():
        await asyncio.sleep(0.01)


def test_a_late_replica_loads_the_latest_step_before_serving(bus_config, endpoint):
    async def scenario(world: World):
        await world.sync.start()
        state = (world.sync.tracker.step, world.sync.gate.step, world.sync.gate.is_open, world.loader.loaded)
        report = await world.policy_loaded(2)
        await until(lambda: world.sync.reporter.is_acknowledged)
        return state, report

    state, report = run(bus_config, endpoint, scenario, published=2)
    assert state == (2, 2, True, [2])
    assert (report.replica_id, report.base_url) == ("replica-t", "http://127.0.0.1:8123/v1")


def test_without_a_published_step_the_base_serves_then_announcements_swap(bus_config, endpoint):
    async def scenario(world: World):
        await world.sync.start()
        base = (world.sync.tracker.step, world.sync.tracker.served.source)
        await world.policy_loaded(0)
        world.trainer.publish(1, WEIGHTS)
        await world.policy_loaded(1)
        metrics = await world.telemetry(MetricsReport, lambda m: "inference/weight_update_s" in m.metrics)
        heartbeat = await world.telemetry(Heartbeat, lambda m: m.step == 1)
        return base, world.sync.gate.step, world.loader.loaded, metrics, heartbeat

    base, gate_step, loaded, metrics, heartbeat = run(bus_config, endpoint, scenario)
    assert base == (0, "base") and gate_step == 1 and loaded == [1]
    assert metrics.step == 1 and metrics.metrics["inference/weight_update_mb"] == WEIGHTS[0][1].nbytes / 1e6
    assert (heartbeat.service, heartbeat.replica_id, heartbeat.status) == ("inference", "replica-t", "ready")


def test_a_refused_transfer_keeps_the_old_step_and_is_reported(bus_config, endpoint):
    async def scenario(world: World):
        world.loader.outcomes[2] = LoadReport(ok=False, step=2, error="checksum mismatch on tensor w", kind="transfer")
        world.sync.tracker.retry_first_s = world.sync.tracker.retry_max_s = 3600.0  # retries: tested below
        await world.sync.start()
        world.trainer.publish(2, WEIGHTS)
        event = await world.telemetry(Event, lambda m: m.kind == "weights_refused")
        return event, world.sync.tracker.step, world.sync.gate.step, world.sync.gate.is_open, world.loader.num_reloads

    event, step, gate_step, is_open, num_reloads = run(bus_config, endpoint, scenario, published=1)
    assert event.level == "error" and "checksum mismatch on tensor w" in event.message
    assert event.fields == {"step": 2, "serving_step": 1, "failure": "transfer", "retry_in_s": 3600.0}
    assert (step, gate_step, is_open, num_reloads) == (1, 1, True, 0)


def test_a_load_failing_half_way_restores_the_base_weights(bus_config, endpoint):
    async def scenario(world: World):
        world.loader.outcomes[2] = LoadReport(ok=False, step=2, error="AssertionError: shape", kind="load")
        world.sync.tracker.retry_first_s = world.sync.tracker.retry_max_s = 3600.0
        await world.sync.start()
        await world.policy_loaded(1)
        world.trainer.publish(2, WEIGHTS)
        await world.policy_loaded(0)
        return world.sync.tracker.served.source, world.loader.num_reloads, world.sync.tracker.last_error

    source, num_reloads, last_error = run(bus_config, endpoint, scenario, published=1)
    assert (source, num_reloads) == ("base", 1)
    assert last_error == "step 2: AssertionError: shape"


def test_a_replica_that_cannot_restore_working_weights_gives_up(bus_config, endpoint):
    async def scenario(world: World):
        world.loader.outcomes[2] = LoadReport(ok=False, step=2, error="AssertionError: shape", kind="load")
        world.loader.reload_error = "disk gone"
        await world.sync.start()
        world.trainer.publish(2, WEIGHTS)
        await until(lambda: world.fatal)
        return world.fatal

    (fatal,) = run(bus_config, endpoint, scenario, published=1)
    assert type(fatal).__name__ == "ReplicaBroken" and "disk gone" in str(fatal)


def test_reload_base_is_serialised_with_swaps_and_reported(bus_config, endpoint):
    async def scenario(world: World):
        await world.sync.start()
        report = await world.sync.reload_base()
        source = world.sync.tracker.served.source  # until step 3 is loaded again (tested below)
        loaded = await world.policy_loaded(0)
        return report.ok, source, loaded.step

    assert run(bus_config, endpoint, scenario, published=3) == (True, "base", 0)


@pytest.mark.parametrize("max_async_level", [0, 1])
def test_a_failed_transfer_is_retried_so_the_orchestrators_policy_gate_opens(bus_config, endpoint, max_async_level):
    """One slow reply (the transfer of step 2 fails once) must not stall the run: the
    orchestrator's step 3 + level needs policy 2 served, and nothing newer will be published."""
    blocked = 3 + max_async_level

    async def scenario(world: World):
        timeout = LoadReport(ok=False, step=2, error="no bucket 0 of step 2 after 3 attempt(s)", kind="transfer")
        world.loader.failures[2] = [timeout]
        world.sync.tracker.retry_first_s = 0.05
        gate = PolicyGate(max_async_level)
        await world.sync.start()
        await world.policy_loaded(1, gate=gate)
        closed_before = not gate.allows(blocked)
        world.trainer.publish(2, WEIGHTS)
        refused = await world.telemetry(Event, lambda m: m.kind == "weights_refused")
        await world.policy_loaded(2, gate=gate)
        return closed_before, refused.fields["retry_in_s"], world.loader.loaded, gate.allows(blocked)

    closed_before, retry_in_s, loaded, opened = run(bus_config, endpoint, scenario, published=1)
    assert closed_before and retry_in_s == 0.05
    assert loaded == [1, 2, 2] and opened


def test_after_a_base_reload_the_trainers_latest_step_is_loaded_again(bus_config, endpoint):
    async def scenario(world: World):
        await world.sync.start()
        await world.policy_loaded(3)
        report = await world.sync.reload_base()
        base = world.sync.tracker.served.source
        await world.policy_loaded(0)  # after any repeat of the report of step 3 from before the reload
        await world.policy_loaded(3)  # at once: not after weights_poll_interval_s, nor never
        return report.ok, base, world.loader.num_reloads, world.loader.loaded, world.sync.tracker.served.source

    assert run(bus_config, endpoint, scenario, published=3) == (True, "base", 1, [3, 3], "trainer")


def test_a_refused_policy_report_is_sent_again_until_acknowledged(bus_config, endpoint):
    """A fresh orchestrator behind the trainer refuses step 2 until a BatchRequest moves it
    there: the replica logs the reason and keeps reporting until an Ack."""

    async def scenario(world: World):
        await world.sync.start()
        identity, _ = await world.bus.recv_before(world.orchestrator, time.monotonic() + 20, PolicyLoaded)
        refusal = Refused(request="PolicyLoaded", reason="policy step 2 is newer than any step built")
        await world.bus.send(world.orchestrator, refusal, identity)
        again = await world.policy_loaded(2)
        await until(lambda: world.sync.reporter.is_acknowledged)
        return again

    assert run(bus_config, endpoint, scenario, published=2).step == 2


def test_a_lora_run_replica_admits_nothing_until_the_adapter_serves(bus_config, endpoint):
    async def scenario(world: World):
        config = world.config.model_copy(update={"enable_lora": True, "await_adapter": "run-a"})
        world.sync = WeightSync(config, world.loader, on_fatal=world.fatal.append)
        await world.sync.start()
        before = (world.sync.tracker.step, world.sync.gate.is_open, world.sync.tracker.ready)
        world.trainer.publish(0, WEIGHTS, lora("run-a"))  # the trainer's fresh adapter, step 0
        await world.policy_loaded(0)
        return before, world.sync.gate.step, world.sync.gate.is_open, world.loader.loaded

    before, gate_step, is_open, loaded = run(bus_config, endpoint, scenario)
    assert before == (None, False, False)  # the base alone would answer requests naming the adapter 404
    assert (gate_step, is_open, loaded) == (0, True, [0])


def test_a_lora_replica_follows_only_its_own_runs_adapter(bus_config, endpoint):
    """Runs sharing a trainer: the replica of run-a asks for run-a's latest step (run-b's is newer)
    and ignores announcements of run-b and of full weights."""

    async def scenario(world: World):
        world.trainer.publish(2, WEIGHTS, lora("run-a"))
        world.trainer.publish(5, WEIGHTS, lora("run-b"))
        config = world.config.model_copy(update={"enable_lora": True, "await_adapter": "run-a"})
        world.sync = WeightSync(config, world.loader, on_fatal=world.fatal.append)
        await world.sync.start()
        started = list(world.loader.loaded)
        world.trainer.publish(7, WEIGHTS, lora("run-b"))
        world.trainer.publish(8, WEIGHTS)
        world.trainer.publish(3, WEIGHTS, lora("run-a"))
        await world.policy_loaded(3)
        return started, world.loader.loaded

    started, loaded = run(bus_config, endpoint, scenario)
    assert (started, loaded) == ([2], [2, 3])


def test_which_announcements_a_replica_follows():
    store = WeightStore(bucket_bytes=1 << 20)
    full, run_a, run_b = (store.add(1, WEIGHTS, meta) for meta in (None, lora("run-a"), lora("run-b")))
    follows = []
    for update in ({}, {"enable_lora": True, "await_adapter": "run-a"}):
        sync = WeightSync(InferenceConfig(port=8123, **update), FakeLoader())
        follows.append([sync.follows(announced) for announced in (full, run_a, run_b)])
        sync.bus.close()
    # Without await_adapter every announcement is offered, as before runs shared a trainer.
    assert follows == [[True, True, True], [False, True, False]]
