"""Two `rlbus rl` runs on one shared trainer (``max_concurrent_runs = 2``): different environments and
learning rates, each on its own adapter; run A's orchestrator is killed with SIGKILL after its first
step and restarted by its launcher while run B goes on. Both finish with contiguous steps, each with
its own curve, no step trained twice, and B never noticed (docs/lora.md, "Several runs, one trainer")."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rlbus.audit import read_audit
from rlbus.config.base import BusEndpoints
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.trainer.lora import base_fingerprint
from rlbus.services.trainer.model import load_model
from tests.conftest import free_tcp_port
from tests.integration.small_run import TRAINING_TOML

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
TRAINER_ENDPOINTS = ("trainer_runs", "trainer_weights", "trainer_announce")
RUN_TIMEOUT_S = 600.0  # generous on a loaded 2-core machine; a hang still fails
LORA_TOML = """
[trainer.lora]
rank = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "up_proj"]
"""


@dataclass(frozen=True)
class Run:
    run_id: str
    env: str
    lr: float
    max_steps: int
    max_restarts: int

    def folder(self, tmp_path: Path) -> Path:
        return tmp_path / self.run_id


RUN_A = Run("reverse-a", "reverse-text", 5e-3, max_steps=4, max_restarts=1)
RUN_B = Run("letter-b", "first-letter", 2e-3, max_steps=3, max_restarts=0)


def endpoint_lines(names: tuple[str, ...] | list[str]) -> str:
    return "\n".join(f'{name} = "tcp://127.0.0.1:{free_tcp_port()}"' for name in names)


def trainer_config(tmp_path: Path, model: Path) -> tuple[Path, dict[str, str]]:
    """The shared trainer's config, and its runs/weights/announce endpoints."""
    endpoints = {name: f"tcp://127.0.0.1:{free_tcp_port()}" for name in BusEndpoints.model_fields}
    lines = "\n".join(f'{name} = "{address}"' for name, address in endpoints.items())
    path = tmp_path / "trainer.toml"
    path.write_text(f"""
model = "{model}"
output_dir = "{tmp_path / "trainer"}"
max_concurrent_runs = 2

[ckpt]
enabled = true
interval = 1

[bus.endpoints]
{lines}
""")
    return path, endpoints


def run_config(tmp_path: Path, model: Path, run: Run, trainer: dict[str, str]) -> Path:
    own = [name for name in BusEndpoints.model_fields if name not in TRAINER_ENDPOINTS]
    training = TRAINING_TOML.replace("lr = 1e-5", f"lr = {run.lr}").replace('"reverse-text"', f'"{run.env}"')
    path = tmp_path / f"{run.run_id}.toml"
    path.write_text(f"""
model = "{model}"
output_dir = "{run.folder(tmp_path)}"
max_steps = {run.max_steps}
num_env_workers = 1
max_restarts = {run.max_restarts}

[shared_trainer]
address = "{trainer["trainer_runs"]}"
weights = "{trainer["trainer_weights"]}"
announce = "{trainer["trainer_announce"]}"
run_id = "{run.run_id}"

[bus.endpoints]
{endpoint_lines(own)}

[inference]
port = {free_tcp_port()}
max_model_len = 512

{training}
{LORA_TOML}
""")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def wait_for(condition, what: str, processes: list[subprocess.Popen]) -> None:
    """Poll ``condition`` until true; fail when a process ended first or the deadline passed."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        ended = [p.args for p in processes if p.poll() is not None]
        assert not ended and time.monotonic() < deadline, f"waiting for {what}: ended {ended}"
        time.sleep(0.5)  # polling interval of a condition on files, not a synchronisation


def orchestrator_pid(run_folder: Path) -> int:
    """The pid the launcher logged for the orchestrator it started last."""
    pids = re.findall(r"started orchestrator \(pid (\d+)\)", (run_folder / "logs" / "rl.log").read_text())
    assert pids, "the launcher logged no orchestrator start"
    return int(pids[-1])


def trained_steps(audit_dir: Path, run: Run) -> list[int]:
    """Steps the shared trainer applied for ``run``, in order (its audit trail: one line per step)."""
    return [record["step"] for record in read_audit(audit_dir / f"trainer-trainer-{run.run_id}.jsonl")
            if record["ok"]] if (audit_dir / f"trainer-trainer-{run.run_id}.jsonl").is_file() else []  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the launcher stops its services; the trainer stops
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_two_runs_share_one_trainer_and_a_killed_orchestrator_touches_only_its_run(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    base = base_fingerprint(load_model(str(model), "float32", torch.device("cpu")))
    audit_dir = tmp_path / "audit"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "RLBUS_AUDIT_DIR": str(audit_dir)}  # fmt: skip
    trainer_path, trainer_endpoints = trainer_config(tmp_path, model)
    command = [sys.executable, "-m", "rlbus"]
    trainer = subprocess.Popen([*command, "trainer", "@", str(trainer_path)], cwd=ROOT, env=env,
                               stdout=(tmp_path / "trainer.out").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    launchers: dict[Run, subprocess.Popen] = {}
    try:
        for run in (RUN_A, RUN_B):
            config = run_config(tmp_path, model, run, trainer_endpoints)
            launchers[run] = subprocess.Popen([*command, "rl", "@", str(config)], cwd=ROOT, env=env,
                                              stdout=(tmp_path / f"{run.run_id}.out").open("wb"),
                                              stderr=subprocess.STDOUT)  # fmt: skip
        everything = [trainer, *launchers.values()]
        wait_for(lambda: trained_steps(audit_dir, RUN_A), "run A's first trained step", everything)
        os.kill(orchestrator_pid(RUN_A.folder(tmp_path)), signal.SIGKILL)
        for run, launcher in launchers.items():
            assert launcher.wait(RUN_TIMEOUT_S) == 0, (tmp_path / f"{run.run_id}.out").read_text()[-4000:]
        assert trainer.poll() is None, "the shared trainer ended while serving runs"
    finally:
        for process in [*launchers.values(), trainer]:
            stop(process)

    for run in (RUN_A, RUN_B):
        folder = run.folder(tmp_path)
        expected = list(range(1, run.max_steps + 1))
        # Every step trained exactly once, in order, by the shared trainer (its own account).
        assert trained_steps(audit_dir, run) == expected, run
        # The run's own curve: the trainer reported this run's steps, with this run's rate, to this run's monitor.
        rows = [m for m in read_jsonl(folder / "metrics.jsonl") if m["service"] == "trainer" and "loss/mean" in m]
        assert sorted({m["step"] for m in rows}) == expected, rows
        assert {m["replica_id"] for m in rows} == {f"trainer-{run.run_id}"}
        assert [m["optim/lr"] for m in rows] == pytest.approx([run.lr] * len(rows)), rows
        keys = {key for m in read_jsonl(folder / "metrics.jsonl") if m["service"] == "orchestrator" for key in m}
        other = (RUN_B if run == RUN_A else RUN_A).env
        assert f"reward/{run.env}/mean" in keys and f"reward/{other}/mean" not in keys, sorted(keys)
        assert [r["step"] for r in read_jsonl(folder / "steps.jsonl")] == expected
        # The adapter trained on the trainer's base, which the checkpoint names by its hash.
        last = tmp_path / "trainer" / "runs" / run.run_id / "checkpoints" / f"step_{run.max_steps}"
        assert json.loads((last / "lora_base.json").read_text())["base_sha256"] == base

    joins = {run: [e for e in read_jsonl(run.folder(tmp_path) / "events.jsonl") if e["kind"] == "run_joined"]
             for run in (RUN_A, RUN_B)}  # fmt: skip
    # A's orchestrator came back and re-joined: the trainer kept A's progress (from step 2 or later on).
    assert "restarted it with the same command" in (RUN_A.folder(tmp_path) / "logs" / "rl.log").read_text()
    assert len(joins[RUN_A]) == 2, joins[RUN_A]
    resumed_from = int(re.search(r"from step (\d+)", joins[RUN_A][1]["message"]).group(1))
    assert resumed_from >= 2, joins[RUN_A]
    # B joined once, was never restarted, and trained its steps in one go.
    assert len(joins[RUN_B]) == 1, joins[RUN_B]
    assert "restarted" not in (RUN_B.folder(tmp_path) / "logs" / "rl.log").read_text()
