"""One service per host: three network namespaces, the quickstart-size run over TCP with CurveZMQ.

Hosts (docs/deploy.md): ``trainer`` (10.x.1), ``inference`` (10.x.2) and ``hub`` (10.x.3:
orchestrator, env-worker, monitor). Each host gets its own run folder and only the key files
docs/security.md says it needs; each service is started exactly as an operator would,
``rlbus <service> @ <service>.toml`` with host-specific flags, inside its namespace. Nothing
is shared but the model folder and the machine's disk cache.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlbus.jsonl import read_json_objects as read_jsonl
from rlbus.services.cli import main as rlbus
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.integration.netns import NetnsLab, netns_unavailable
from tests.integration.small_run import TRAINING_TOML

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 2
RUN_TIMEOUT_S = 1200
HOSTS = ("trainer", "inference", "hub")
SERVICES = {"trainer": ["trainer"], "inference": ["inference"], "hub": ["monitor", "orchestrator", "env-worker"]}
BINDS = {"trainer", "hub"}  # hosts whose services bind: they hold the server secret and the allow list
API_KEY = "multi-host-test-key"


def rl_toml(lab: NetnsLab, model: Path, configs_dir: Path) -> str:
    hub, trainer, inference = (lab.hosts[h].address for h in ("hub", "trainer", "inference"))
    return f"""
model = "{model}"
output_dir = "{configs_dir}"
max_steps = {MAX_STEPS}

[bus.endpoints]
orchestrator_tasks = "tcp://{hub}:5550"
orchestrator_batches = "tcp://{hub}:5551"
orchestrator_policy = "tcp://{hub}:5552"
trainer_weights = "tcp://{trainer}:5553"
trainer_announce = "tcp://{trainer}:5554"
monitor_telemetry = "tcp://{hub}:5555"
monitor_view = "tcp://{hub}:5556"

[inference]
host = "{inference}"
port = 8000
api_key = "{API_KEY}"
max_model_len = 512

{TRAINING_TOML}
[env_worker]
inference_urls = ["http://{inference}:8000/v1"]
"""


def host_keys(keys: Path, host: str, folder: Path) -> Path:
    """The files ``host`` needs (docs/security.md): never another host's client secret."""
    (folder / "clients").mkdir(parents=True)
    shutil.copy(keys / "server.key", folder)
    shutil.copy(keys / "clients" / f"{host}.key_secret", folder / "clients")
    if host in BINDS:
        shutil.copy(keys / "server.key_secret", folder)
        for public in (keys / "clients").glob("*.key"):
            shutil.copy(public, folder / "clients")
    return folder


def wait_for_exit(processes: dict[str, subprocess.Popen], name: str, logs: Path, timeout_s: float) -> int:
    """Exit code of ``processes[name]``; fails at once with the log tails if another service dies first."""
    waited = 0.0
    while waited < timeout_s:
        try:
            return processes[name].wait(timeout=5)
        except subprocess.TimeoutExpired:
            waited += 5
        dead = {n: p.returncode for n, p in processes.items() if n != name and p.poll() not in (None, 0)}
        if dead:
            raise AssertionError(f"{dead} died while waiting for {name}:\n{log_tails(logs)}")
    raise AssertionError(f"{name} did not finish within {timeout_s}s:\n{log_tails(logs)}")


def log_tails(logs: Path) -> str:
    return "\n".join(f"== {out.name}\n" + "\n".join(out.read_text(errors="replace").splitlines()[-15:])
                     for out in sorted(logs.glob("*.out")))  # fmt: skip


def stop(process: subprocess.Popen) -> int | None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        return None  # NetnsLab.close kills it


def test_three_hosts_over_tcp_with_curve(tmp_path):
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces are not available here: {reason}")
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    assert rlbus(["keys", "--out", str(tmp_path / "keys"), "--clients", ",".join(HOSTS)]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLBUS_", "WANDB_")) and "proxy" not in k.lower()}
    env |= {"PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # Resolved config files hold secrets redacted: each host is given the key in its environment.
    env |= {"RLBUS_INFERENCE__API_KEY": API_KEY, "RLBUS_ENV_WORKER__API_KEY": API_KEY}
    logs = tmp_path / "out"
    logs.mkdir()
    with NetnsLab(list(HOSTS), subnet=f"{random.randint(100, 250)}.{os.getpid() % 250}") as lab:
        configs = tmp_path / "shared"
        (tmp_path / "rl.toml").write_text(rl_toml(lab, model, configs))
        assert rlbus(["rl", "@", str(tmp_path / "rl.toml"), "--dry-run"]) == 0
        processes: dict[str, subprocess.Popen] = {}
        for host, services in SERVICES.items():
            keys = host_keys(tmp_path / "keys", host, tmp_path / host / "keys")
            for service in services:
                argv = [sys.executable, "-m", "rlbus", service, "@", str(configs / "configs" / f"{service}.toml"),
                        "--output-dir", str(tmp_path / host / "run"), "--bus.curve.keys-dir", str(keys),
                        "--bus.curve.client-name", host]  # fmt: skip
                argv += ["--worker-id", "env-worker-0"] if service == "env-worker" else []
                with (logs / f"{service}.out").open("wb") as output:
                    processes[service] = lab.start(host, argv, ROOT, env, output)

        assert wait_for_exit(processes, "orchestrator", logs, RUN_TIMEOUT_S) == 0, log_tails(logs)
        assert wait_for_exit(processes, "trainer", logs, 300) == 0, log_tails(logs)
        for name in ("env-worker", "inference", "monitor"):
            stop(processes[name])

    hub_run = tmp_path / "hub" / "run"
    metrics = read_jsonl(hub_run / "metrics.jsonl")  # the monitor's file, on the hub
    trainer_steps = sorted({m["step"] for m in metrics if m["service"] == "trainer" and "loss/mean" in m})
    assert trainer_steps == list(range(1, MAX_STEPS + 1)), trainer_steps
    rewards = sorted(m["step"] for m in metrics if m["service"] == "orchestrator" and "reward/all/mean" in m)
    assert rewards == list(range(1, MAX_STEPS + 1)), rewards
    # Weights went from the trainer host to the inference host: a later batch was sampled by policy 1.
    sampled = [m["policy/sampled_step/max"] for m in metrics if "policy/sampled_step/max" in m]
    assert sampled and max(sampled) >= 1, sampled
    for host in BINDS:
        for service in SERVICES[host]:
            if service == "env-worker":
                continue
            text = (tmp_path / host / "run" / "logs" / f"{service}.log").read_text()
            assert "CurveZMQ: admitting 3 client key(s)" in text and "refused a peer" not in text, service
    # No host got a client secret but its own.
    assert sorted(p.name for p in (tmp_path / "inference" / "keys").rglob("*")) == [
        "clients", "inference.key_secret", "server.key"]  # fmt: skip
