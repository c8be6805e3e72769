"""Two real ``rlbus inference`` replicas on the tiny model and one trainer WeightServer (the test): replica 2
lists replica 1's weight relay as its ``weights_upstream``, so it takes each step from replica 1, checked
against the trainer's manifest, and the trainer uploads each step once instead of twice. With replica 1
killed (SIGKILL), replica 2 takes the next step from the trainer.

Where each step came from is read from the replicas' ``inference/weight_relay_mb`` and
``inference/weight_trainer_mb`` metrics; that both replicas hold the same weights, from their greedy
completions and logprobs, which differ from the base model's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import zmq

from rlbus.bus import Bus, PeerUnreachable
from rlbus.config.base import BusConfig, BusEndpoints, to_toml
from rlbus.messages import Ack, Heartbeat, MetricsReport, PolicyLoaded
from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.policy import policy_ref
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.weights import WeightServer, WeightStore
from tests.conftest import free_tcp_port
from tests.integration.inference_replica import seeded_weights

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

STARTUP_S = 600  # two vLLM replicas starting at once on a loaded 2-core machine
LOAD_S = 120
PROMPT_IDS = list(b"The quick brown fox")  # the tiny tokenizer is byte-level: ids are bytes
FIRST, SECOND = "replica-1", "replica-2"


@dataclass
class Fleet:
    """The test as trainer, orchestrator and monitor, and the replica processes."""

    model_dir: Path
    bus: Bus
    bus_config: BusConfig
    trainer: WeightServer
    monitor: zmq.Socket
    orchestrator: zmq.Socket
    relay: str
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, name: str, workdir: Path, **fan_out) -> None:
        self.ports[name] = free_tcp_port()
        config = InferenceConfig(model=str(self.model_dir), output_dir=workdir / name, port=self.ports[name],
                                 max_model_len=256, max_num_seqs=4, replica_id=name, startup_weights_timeout_s=5,
                                 bus=self.bus_config, weights_relay_timeout_s=5, weights_relay_wait_s=60,
                                 **fan_out)  # fmt: skip
        path = workdir / f"{name}.toml"
        path.write_text(to_toml(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")} | {"VLLM_CPU_KVCACHE_SPACE": "1"}
        self.logs[name] = workdir / f"{name}.log"
        with self.logs[name].open("wb") as log:
            self.processes[name] = subprocess.Popen([sys.executable, "-m", "rlbus", "inference", "@", str(path)],
                                                    stdout=log, stderr=subprocess.STDOUT, env=env,
                                                    start_new_session=True)  # fmt: skip

    def kill(self, name: str) -> None:
        """SIGKILL the replica and vLLM's processes (they share its session)."""
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(30)

    def stop(self) -> None:
        for name in list(self.processes):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            self.kill(name)

    def log_tails(self) -> str:
        return "\n".join(f"--- {name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:])
                         for name, path in self.logs.items())  # fmt: skip

    def telemetry(self, names: set[str], want, timeout_s: float, what: str) -> dict[str, object]:
        """The first telemetry message from each of ``names`` that ``want`` accepts; PolicyLoaded
        reports are acknowledged meanwhile, as an orchestrator would."""
        found: dict[str, object] = {}
        deadline = time.monotonic() + timeout_s
        while set(found) != names:
            for name in names:
                process = self.processes[name]
                assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.log_tails()}"
            assert time.monotonic() < deadline, f"{what}: only {sorted(found)} within {timeout_s}s\n{self.log_tails()}"
            self._ack_policies()
            message = self.bus.recv_before(self.monitor, time.monotonic() + 0.5, None)
            sender = getattr(message, "replica_id", None)
            if sender in names and sender not in found and want(message):
                found[sender] = message
        return found

    def _ack_policies(self) -> None:
        while (received := self.bus.recv_before(self.orchestrator, time.monotonic(), PolicyLoaded)) is not None:
            identity, report = received
            try:
                self.bus.send(self.orchestrator, Ack(ref=policy_ref(report.step)), identity)
            except PeerUnreachable:  # a report queued by the replica this test killed
                pass

    def publish_and_wait(self, step: int, names: set[str]) -> tuple[int, dict[str, dict[str, float]]]:
        """Publish seeded weights as ``step``; (bytes the trainer sent for it, each replica's swap metrics)."""
        served_before = self.trainer.bytes_served
        announced = self.trainer.publish(step, seeded_weights(self.model_dir, seed=step)[0])
        assert announced.num_buckets >= 3, "buckets to relay one by one"
        reports = self.telemetry(names, lambda m: isinstance(m, MetricsReport) and m.step == step
                                 and "inference/weight_relay_mb" in m.metrics, LOAD_S, f"step {step} loaded")  # fmt: skip
        return self.trainer.bytes_served - served_before, {name: r.metrics for name, r in reports.items()}  # type: ignore[attr-defined]

    def greedy(self, name: str) -> tuple[list[int], list[float], int]:
        """(token ids, their logprobs, policy step) of a greedy completion on replica ``name``."""
        body = {"model": str(self.model_dir), "prompt": PROMPT_IDS, "max_tokens": 8, "temperature": 0,
                "logprobs": 1, "return_token_ids": True, "ignore_eos": True}  # fmt: skip
        reply = httpx.post(f"http://127.0.0.1:{self.ports[name]}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        return choice["token_ids"], choice["logprobs"]["token_logprobs"], reply.json()["policy_step"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("relay")
    model_dir = build_tiny_model(workdir / "tiny", TinyModelConfig(out=workdir / "tiny"))
    endpoints = {name: f"tcp://127.0.0.1:{free_tcp_port()}" for name in BusEndpoints.model_fields}
    bus_config = BusConfig(endpoints=BusEndpoints(**endpoints), linger_ms=0, request_timeout_s=10,
                           heartbeat_interval_s=1)  # fmt: skip
    bus = Bus(bus_config)
    store = WeightStore(bucket_bytes=256 << 10)
    trainer = WeightServer(bus, endpoints["trainer_weights"], endpoints["trainer_announce"], store).start()
    fleet = Fleet(model_dir, bus, bus_config, trainer, bus.bind(zmq.PULL, endpoints["monitor_telemetry"], "telemetry"),
                  bus.bind(zmq.ROUTER, endpoints["orchestrator_policy"], "policy"),
                  f"tcp://127.0.0.1:{free_tcp_port()}")  # fmt: skip
    try:
        fleet.start(FIRST, workdir, weights_relay=fleet.relay)
        fleet.start(SECOND, workdir, weights_upstream=[fleet.relay])
        fleet.telemetry({FIRST, SECOND}, lambda m: isinstance(m, Heartbeat) and m.status == "ready", STARTUP_S,
                        "replicas ready")  # fmt: skip
        yield fleet
    finally:
        fleet.stop()
        trainer.stop()
        bus.close()


def test_replica_2_takes_each_step_from_replica_1_and_falls_back_to_the_trainer_when_it_dies(fleet):
    base = fleet.greedy(SECOND)
    for step in (1, 2):
        uploaded, metrics = fleet.publish_and_wait(step, {FIRST, SECOND})
        model_mb = metrics[FIRST]["inference/weight_update_mb"]
        assert (metrics[FIRST]["inference/weight_trainer_mb"], metrics[FIRST]["inference/weight_relay_mb"]) == (
            model_mb, 0.0)  # fmt: skip
        assert (metrics[SECOND]["inference/weight_relay_mb"], metrics[SECOND]["inference/weight_trainer_mb"]) == (
            model_mb, 0.0), "replica 2 took the whole step from replica 1's relay"  # fmt: skip
        assert uploaded / 1e6 == pytest.approx(model_mb), "the trainer uploaded the step once, not twice"
        first, second = fleet.greedy(FIRST), fleet.greedy(SECOND)
        assert second[2] == first[2] == step
        assert second[0] == first[0] and second[1] == pytest.approx(first[1], abs=1e-6), "the same weights"
        assert second[0] != base[0], "the step changed what replica 2 generates"

    fleet.kill(FIRST)
    uploaded, metrics = fleet.publish_and_wait(3, {SECOND})
    model_mb = metrics[SECOND]["inference/weight_update_mb"]
    assert (metrics[SECOND]["inference/weight_trainer_mb"], metrics[SECOND]["inference/weight_relay_mb"]) == (
        model_mb, 0.0), "with its upstream dead, replica 2 took the step from the trainer"  # fmt: skip
    assert uploaded / 1e6 == pytest.approx(model_mb)
    assert fleet.greedy(SECOND)[2] == 3
