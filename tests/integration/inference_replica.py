"""A real ``rlbus inference`` subprocess on the tiny model, with the test as trainer, orchestrator and monitor.

Used by the vLLM integration tests: the replica starts once per module. The
test side binds the trainer's weight endpoints (a real :class:`WeightServer`
whose store can corrupt chosen steps in transit), the orchestrator's policy
ROUTER and the monitor's PULL, so readiness and swaps are awaited as bus
messages, never by sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq
from safetensors.numpy import load_file

from rlbus.bus import Bus
from rlbus.config.base import BusConfig, BusEndpoints
from rlbus.messages import Ack, Event, Heartbeat, PolicyLoaded, WeightsBucket
from rlbus.services.inference.policy import policy_ref
from rlbus.weights import NamedArray, WeightServer, WeightStore
from tests.conftest import free_tcp_port

STARTUP_S = 600  # vLLM on a loaded 2-core machine
API_KEY = "test-key"


class TamperingStore(WeightStore):
    """Serves the steps in ``corrupt_steps`` with one value flipped after the checksum was taken."""

    corrupt_steps: set[int]

    def bucket(self, step: int, index: int, nonce: int = 0, base_step: int | None = None, adapter: str = ""):
        reply = super().bucket(step, index, nonce, base_step, adapter)
        if step in self.corrupt_steps and isinstance(reply, WeightsBucket) and index == 0:
            tampered = reply.tensors[0].copy()
            tampered.reshape(-1).view(np.uint8)[0] ^= 0xFF
            reply.tensors[0] = tampered
        return reply


def seeded_weights(model_dir: Path, seed: int, dtype: str = "float32") -> tuple[list[NamedArray], dict]:
    """Random-but-seeded new weights for every checkpoint tensor: (to publish, float32 state for transformers).

    The noise (std 0.2, ten times the init) makes greedy choices decisive and
    different from the base model's. ``bfloat16`` travels as uint16 bits.
    """
    rng = np.random.default_rng(seed)
    published, state = [], {}
    for name, array in load_file(str(model_dir / "model.safetensors")).items():
        if not name.endswith("norm.weight"):
            array = (array + rng.normal(0.0, 0.2, array.shape)).astype(np.float32)
        if dtype == "bfloat16":
            import torch

            bf16 = torch.from_numpy(array).to(torch.bfloat16)
            published.append((name, bf16.view(torch.uint16).numpy(), "bfloat16"))
            state[name] = bf16.to(torch.float32).numpy()
        else:
            published.append((name, array, "float32"))
            state[name] = array
    return published, state


def write_lora(folder: Path, model_dir: Path, seed: int, rank: int = 8, alpha: int = 16) -> dict[str, np.ndarray]:
    """A PEFT LoRA adapter on q_proj and v_proj; returns the weight delta ``alpha/rank * B @ A`` per tensor."""
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors, deltas = {}, {}
    for name, array in load_file(str(model_dir / "model.safetensors")).items():
        if not name.endswith(("q_proj.weight", "v_proj.weight")):
            continue
        a = rng.normal(0.0, 0.3, (rank, array.shape[1])).astype(np.float32)
        b = rng.normal(0.0, 0.3, (array.shape[0], rank)).astype(np.float32)
        prefix = f"base_model.model.{name.removesuffix('.weight')}"
        tensors |= {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}
        deltas[name] = (alpha / rank) * b @ a
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "base_model_name_or_path": str(model_dir),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return deltas


class Replica:
    """The running replica and the test's bus sockets around it."""

    def __init__(self, model_dir: Path, workdir: Path) -> None:
        self.model_dir = model_dir
        endpoints = {name: f"tcp://127.0.0.1:{free_tcp_port()}" for name in BusEndpoints.model_fields}
        self.bus_config = BusConfig(endpoints=BusEndpoints(**endpoints), linger_ms=0, request_timeout_s=10,
                                    heartbeat_interval_s=1)  # fmt: skip
        self.bus = Bus(self.bus_config)
        self.store = TamperingStore(bucket_bytes=2 << 20)
        self.store.corrupt_steps = set()
        self.trainer = WeightServer(self.bus, endpoints["trainer_weights"], endpoints["trainer_announce"],
                                    self.store).start()  # fmt: skip
        self.monitor = self.bus.bind(zmq.PULL, endpoints["monitor_telemetry"], "telemetry")
        self.orchestrator = self.bus.bind(zmq.ROUTER, endpoints["orchestrator_policy"], "policy")
        self.port = free_tcp_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "inference.toml"
        self.lora_dir = workdir / "loras"
        """The only folder ``POST /rlbus/load_lora`` loads adapters from."""
        self.log_path = workdir / "inference.log"
        self.process: subprocess.Popen | None = None
        self.first_health: dict = {}
        self.first_greedy: tuple[list[int], int] = ([], -1)
        self._write_config(workdir)

    def _write_config(self, workdir: Path) -> None:
        from rlbus.config.base import to_toml
        from rlbus.services.inference.config import InferenceConfig

        config = InferenceConfig(model=str(self.model_dir), output_dir=workdir / "out", port=self.port,
                                 max_model_len=512, max_num_seqs=16, replica_id="replica-test",
                                 enable_lora=True, max_lora_rank=8, lora_dir=self.lora_dir,
                                 startup_weights_timeout_s=30, bus=self.bus_config)  # fmt: skip
        self.config_path.write_text(to_toml(config))

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
        # The key comes from the environment, as a deployment would pass a secret.
        env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "RLBUS_INFERENCE__API_KEY": API_KEY}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rlbus", "inference", "@", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.wait_telemetry(Heartbeat, lambda m: m.status == "ready", STARTUP_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            # vLLM's engine and worker processes share the session: make sure none is left.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(30)
        self.trainer.stop()
        self.bus.close()

    def log_tail(self, num_lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the replica exited with {self.process.returncode}:\n{self.log_tail()}")

    def wait_telemetry(self, kind: type, predicate=lambda m: True, timeout_s: float = 120):
        """The next telemetry message of ``kind`` from the replica that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            message = self.bus.recv_before(self.monitor, min(deadline, time.monotonic() + 1), None)
            if isinstance(message, kind) and getattr(message, "replica_id", None) == "replica-test" \
                    and predicate(message):  # fmt: skip
                return message
        raise AssertionError(f"no matching {kind.__name__} within {timeout_s}s:\n{self.log_tail()}")

    def wait_event(self, kind: str, timeout_s: float = 120) -> Event:
        return self.wait_telemetry(Event, lambda m: m.kind == kind, timeout_s)

    def wait_policy(self, step: int, timeout_s: float = 120) -> PolicyLoaded:
        """The replica's PolicyLoaded for ``step``, acknowledged as an orchestrator would."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            received = self.bus.recv_before(self.orchestrator, min(deadline, time.monotonic() + 1), PolicyLoaded)
            if received is not None:
                identity, report = received
                self.bus.send(self.orchestrator, Ack(ref=policy_ref(report.step)), identity)
                if report.step == step:
                    return report
        raise AssertionError(f"no PolicyLoaded for step {step} within {timeout_s}s:\n{self.log_tail()}")
