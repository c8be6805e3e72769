"""The real orchestrator with real env-worker processes (``rlbus orchestrator``, ``rlbus env-worker``)
against a fake vLLM HTTP server, a fake trainer and a fake monitor: an env-worker killed with
SIGKILL while it holds tasks loses none of them, and the run trains every step on real rollouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from rlbus.bus import Bus

from .fake_vllm import FakePolicy, alternating_answer, serve_fake_vllm
from .orchestrator_peers import (
    TIMEOUT_S,
    FakeTrainer,
    MonitorSink,
    PolicyClock,
    ipc_bus_config,
    remove_folder,
    short_folder,
)  # fmt: skip

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def start(command: str, config: dict, folder: Path, name: str) -> subprocess.Popen:
    path = folder / f"{name}.toml"
    path.write_text(tomli_w.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    log = open(folder / f"{name}.out", "w")  # noqa: SIM115 - closed with the process at teardown
    return subprocess.Popen([sys.executable, "-m", "rlbus", command, "@", str(path)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


@pytest.fixture
def folder():
    path = short_folder()
    yield path
    remove_folder(path)


def test_killed_env_worker_loses_no_task_and_every_step_is_trained(folder, tmp_path):
    bus_config = ipc_bus_config(folder)
    clock = PolicyClock()
    policy = FakePolicy(alternating_answer(), policy_step=lambda: clock.step)
    policy.gate.clear()  # hold every completion until the first worker is dead
    shared = {"output_dir": str(tmp_path), "max_steps": 3, "bus": bus_config.model_dump(mode="json", exclude_none=True)}
    processes: list[subprocess.Popen] = []
    trainer = FakeTrainer(bus_config, clock, 1, 3)
    with serve_fake_vllm(policy) as url, Bus(bus_config) as bus:
        monitor = MonitorSink(bus, bus_config.endpoints.monitor_telemetry)
        orchestrator_config = shared | {
            "batch_size": 4, "rollouts_per_example": 2, "seq_len": 512, "task_lease_s": 3.0,
            "sampling": {"max_tokens": 32}, "train": {"env": [{"id": "reverse-text"}]}, "ckpt": {"interval": 1},
        }  # fmt: skip
        worker_config = shared | {"inference_urls": [url], "max_concurrent_tasks": 2}
        try:
            orchestrator = start("orchestrator", orchestrator_config, tmp_path, "orchestrator")
            processes.append(orchestrator)
            doomed = start("env-worker", worker_config, tmp_path, "worker-a")
            processes.append(doomed)
            policy.wait_held(1, TIMEOUT_S)  # the doomed worker now holds at least one task
            os.kill(doomed.pid, signal.SIGKILL)
            assert doomed.wait(TIMEOUT_S) == -signal.SIGKILL
            policy.gate.set()
            processes.append(start("env-worker", worker_config, tmp_path, "worker-b"))
            trainer.start()
            assert orchestrator.wait(TIMEOUT_S) == 0, (tmp_path / "orchestrator.out").read_text()[-3000:]
            trainer.join(TIMEOUT_S)
        finally:
            for process in processes:
                stop(process)
        reports = monitor.metrics()
    assert trainer.error is None and trainer.acked == [1, 2, 3]
    steps = [r.metrics for r in reports if "tasks/reissued" in r.metrics]
    assert len(steps) == 3
    assert sum(m["tasks/reissued"] for m in steps) >= 1, "the dead worker's tasks must be issued again"
    assert sum(m["batch/num_loss_tokens"] for m in steps) > 0, "real rollouts with differing rewards are trained on"
    names = sorted(p.name for p in (tmp_path / "checkpoints" / "orchestrator").iterdir())
    progress = [name for name in names if ".upto_" not in name]  # compacted journals aside
    assert progress == ["journal.jsonl", "step_1.json", "step_2.json", "step_3.json"]
