"""`rlbus rl --slurm` on a real single-node SLURM: the quickstart-size run as job arrays (its trainer
task starting 2 ranks), and cancellation.

The cluster (munged, slurmctld, slurmd from Debian's slurm-wlm and munge) is started by
scripts/slurm/local_cluster.py with all its state in a temp folder and stopped, jobs
cancelled first, even when a test fails. The bus runs with CurveZMQ keys, which reach
the services inside the job scripts.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlbus.jsonl import read_json_objects as read_jsonl
from rlbus.services.launcher.slurm_ctl import TERMINAL_STATES, expand_task_ids
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.conftest import free_tcp_port
from tests.integration.platform_server import PlatformServer
from tests.integration.small_run import TRAINING_TOML, loopback_endpoints

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "slurm" / "local_cluster.py"
INSTALL = ROOT / "scripts" / "ci" / "install_slurm.sh"
MAX_STEPS = 3
NUM_ENV_WORKERS = 2
NUM_REPLICAS = 2
TRAINER_RANKS = 2


def arrays(num_replicas: int) -> dict[str, int]:
    return {"monitor": 1, "orchestrator": 1, "trainer": 1, "inference": num_replicas, "env-worker": NUM_ENV_WORKERS}


def ensure_slurm_installed() -> None:
    if shutil.which("slurmctld") is None:
        subprocess.run(["bash", str(INSTALL)], check=False, timeout=600)
    if shutil.which("slurmctld") is None:
        pytest.skip("slurmctld is missing and scripts/ci/install_slurm.sh could not install it: a CI setup bug")


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    ensure_slurm_installed()
    if os.geteuid() != 0:
        pytest.skip("a private SLURM cluster's daemons run as root; this test runs as a user")
    state = Path(tempfile.mkdtemp(prefix="rlbus-slurm-"))
    try:
        subprocess.run([sys.executable, str(CLUSTER), "up", str(state)], check=True, timeout=120)
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    finally:
        subprocess.run([sys.executable, str(CLUSTER), "down", str(state)], timeout=300, check=False)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(out, TinyModelConfig(out=out))


def run_config(tmp_path: Path, model: Path, num_replicas: int = 1) -> Path:
    subprocess.run([sys.executable, "-m", "rlbus", "keys", "--out", str(tmp_path / "keys")],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    endpoints = loopback_endpoints()
    path = tmp_path / "rl.toml"
    path.write_text(f"""
model = "{model}"
output_dir = "{tmp_path / "run"}"
max_steps = {MAX_STEPS}
num_env_workers = {NUM_ENV_WORKERS}

[bus.endpoints]
{endpoints}

[bus.curve]
keys_dir = "{tmp_path / "keys"}"

[inference]
port = {free_tcp_port()}
max_model_len = 512

{TRAINING_TOML}
[slurm]
output = "{tmp_path / "node-out"}/%x-%A_%a.out"
poll_interval_s = 1.0
num_inference_replicas = {num_replicas}
""")
    (tmp_path / "node-out").mkdir()
    return path


def controller_tasks(env: dict[str, str], run: Path) -> dict[str, list[tuple[str, str]]]:
    """service -> [(task id, state)] of the arrays this run submitted, from the controller."""
    arrays = json.loads((run / "slurm_jobs.json").read_text())
    ids = ",".join(a["array_job_id"] for a in arrays)
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ids, "-o", "%F|%K|%T"], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    service_of = {a["array_job_id"]: a["service"] for a in arrays}
    tasks: dict[str, list[tuple[str, str]]] = {}
    for line in out.split():
        array_id, task_ids, state = line.split("|")
        for task_id in expand_task_ids(task_ids):  # a pending array shows as one row: "0-1"
            tasks.setdefault(service_of[array_id], []).append((str(task_id), state))
    return {service: sorted(rows) for service, rows in tasks.items()}


def wait_terminal(env: dict[str, str], run: Path, timeout_s: float) -> dict[str, list[tuple[str, str]]]:
    """The run's tasks once the controller shows every one in a terminal state (or at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = controller_tasks(env, run)
        states = [state for rows in tasks.values() for _, state in rows]
        if all(state in TERMINAL_STATES for state in states) or time.monotonic() > deadline:
            return tasks
        time.sleep(1.0)  # the controller offers no wait on a job's state: poll it, like squeue users do


def service_processes(run: Path) -> list[str]:
    """Processes whose command line names this run's folder (services and task runners)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and str(run) in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def test_rl_as_slurm_arrays_trains_contiguous_steps(slurm_env, tiny_model, tmp_path):
    config = run_config(tmp_path, tiny_model, NUM_REPLICAS)
    # The run also streams to a (local) Prime platform: its settings travel in the job scripts.
    with PlatformServer() as platform:
        result = subprocess.run([sys.executable, "-m", "rlbus", "rl", "@", str(config), "--slurm",
                                 "--trainer.num-ranks", str(TRAINER_RANKS),
                                 "--prime-platform.base-url", platform.base_url], cwd=ROOT,
                                env={**slurm_env, "PRIME_API_KEY": platform.api_key}, capture_output=True, text=True,
                                timeout=1500, check=False)  # fmt: skip
    run = tmp_path / "run"
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    assert len(platform.of("register")) == 1
    streamed = [s for s in dict.fromkeys(r.body["metrics"]["step"] for r in platform.of("metrics")) if s >= 1]
    assert streamed == list(range(1, MAX_STEPS + 1)), streamed
    assert [r.body for r in platform.of("status")] == [{"status": "completed"}]

    tasks = controller_tasks(slurm_env, run)
    assert {s: len(rows) for s, rows in tasks.items()} == arrays(NUM_REPLICAS), tasks
    assert tasks["orchestrator"] == [("0", "COMPLETED")], tasks
    assert all(state in ("COMPLETED", "CANCELLED") for rows in tasks.values() for _, state in rows), tasks
    assert service_processes(run) == []

    metrics = read_jsonl(run / "metrics.jsonl")
    trainer_steps = sorted({m["step"] for m in metrics if m["service"] == "trainer" and "loss/mean" in m})
    assert trainer_steps == list(range(1, MAX_STEPS + 1)), trainer_steps
    # The trainer task started its ranks on its node; each rank wrote its log into the shared run folder.
    assert f"{TRAINER_RANKS} ranks of trainer started" in (run / "logs" / "trainer.log").read_text()
    for rank in range(TRAINER_RANKS):
        rank_log = (run / "logs" / "trainer" / f"rank_{rank}.log").read_text()
        assert f"rank {rank} of {TRAINER_RANKS} joined the process group" in rank_log, rank
    orchestrator = (run / "configs" / "slurm" / "orchestrator-0.toml").read_text()
    assert f"trainer_world_size = {TRAINER_RANKS}" in orchestrator
    rewards = sorted({m["step"] for m in metrics if m["service"] == "orchestrator" and "reward/all/mean" in m})
    assert rewards == list(range(1, MAX_STEPS + 1)), rewards

    # Both replicas (array tasks on ports port+i) served a trained policy to the orchestrator. Not
    # necessarily step 1: a replica that starts late (two vLLMs starting on 2 cores) loads the newest.
    events = read_jsonl(run / "events.jsonl")
    loaded = {e["replica_id"] for e in events if e["kind"] == "policy_loaded" and e["step"] >= 1}
    assert loaded == {f"inference-{i}" for i in range(NUM_REPLICAS)}, loaded
    # Each task filled in its peers' addresses on its node, and the keys travelled with the script.
    worker = (run / "configs" / "slurm" / "env-worker-1.toml").read_text()
    assert "{" not in worker and "tcp://127.0.0.1:" in worker and str(tmp_path / "keys") in worker
    assert worker.count("http://127.0.0.1:") == NUM_REPLICAS
    # Every task's console was streamed back and copied next to the launcher's log.
    for name in ("monitor", "orchestrator", "trainer", "inference-0", "inference-1", "env-worker-0", "env-worker-1"):
        assert (run / "logs" / f"{name}.out").stat().st_size > 0, name
    assert "[monitor]" in result.stdout and f"step {MAX_STEPS}" in result.stdout


class Lines:
    """A process's output lines, readable with a deadline."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(popen,), daemon=True).start()

    def _read(self, popen: subprocess.Popen) -> None:
        for line in popen.stdout:
            self.lines.put(line)

    def wait_for(self, *texts: str, timeout_s: float) -> None:
        """Until one line holds every one of ``texts``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if all(text in line for text in texts):
                return
        raise AssertionError(f"{texts!r} not seen in {timeout_s:g}s; last lines:\n{''.join(self.seen[-40:])}")


@pytest.mark.parametrize("how", ["ctrl-c", "slurm-cancel"])
def test_cancelling_ends_every_task(slurm_env, tiny_model, tmp_path, how):
    config = run_config(tmp_path, tiny_model)
    command = [sys.executable, "-m", "rlbus", "rl", "@", str(config)]
    launcher = subprocess.Popen([*command, "--slurm"], cwd=ROOT, env=slurm_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines = Lines(launcher)
        # Every task has started (the env-workers' array is submitted last).
        lines.wait_for(f"env-worker-{NUM_ENV_WORKERS - 1} (job", "RUNNING", timeout_s=300)
        if how == "ctrl-c":
            launcher.send_signal(signal.SIGINT)
            expected = 128 + signal.SIGINT
        else:
            cancel = subprocess.run([*command, "--slurm-cancel"], cwd=ROOT, env=slurm_env, capture_output=True,
                                    text=True, timeout=300, check=False)  # fmt: skip
            assert cancel.returncode == 0, cancel.stderr[-3000:]
            expected = 1  # the launcher sees its services cancelled: the run failed
        assert launcher.wait(timeout=300) == expected
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    run = tmp_path / "run"
    tasks = controller_tasks(slurm_env, run)
    assert {s: len(rows) for s, rows in tasks.items()} == arrays(1), tasks
    assert all(state == "CANCELLED" for rows in tasks.values() for _, state in rows), tasks
    assert service_processes(run) == []


def rlbus_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlbus", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def listed(env: dict[str, str], run_id: str) -> dict:
    result = rlbus_cli(env, "list", "--json")
    assert result.returncode == 0, result.stderr
    return next(row for row in json.loads(result.stdout) if row["id"] == run_id)


def wait_listed(env: dict[str, str], run_id: str, condition, what: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while not condition(row := listed(env, run_id)):
        if time.monotonic() > deadline:
            console = Path(row["console"])
            tail = console.read_text()[-4000:] if console.is_file() else "(no console)"
            raise AssertionError(f"run {run_id} not {what} after {timeout_s:g}s: {row}\n{tail}")
        time.sleep(1.0)
    return row


def start_run(env: dict[str, str], config: Path, *flags: str) -> str:
    result = rlbus_cli(env, "run", "@", str(config), "--slurm", "--max-steps", "2", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SLURM job arrays" in result.stdout, result.stdout
    return result.stdout.split()[2]


def test_rlbus_run_slurm_list_logs_stop(slurm_env, tiny_model, tmp_path):
    env = {**slurm_env, "RLBUS_HOME": str(tmp_path / "home")}
    (tmp_path / "done").mkdir()
    done = start_run(env, run_config(tmp_path / "done", tiny_model))
    row = wait_listed(env, done, lambda r: r["slurm_jobs"] and r["status"] == "running", "submitted", 60)
    run = tmp_path / "done" / "run"
    assert row["slurm_jobs"] == {
        a["service"]: a["array_job_id"] for a in json.loads((run / "slurm_jobs.json").read_text())
    }
    row = wait_listed(env, done, lambda r: r["status"] != "running", "ended", 600)
    assert (row["status"], row["step"], row["max_steps"], row["exit_code"]) == ("completed", 2, 2, 0), row
    assert all(state in ("COMPLETED", "CANCELLED") for rows in controller_tasks(env, run).values() for _, state in rows)

    # Every env-worker task appends to one env-worker.log; each task's console came back as <task>.out.
    logs = rlbus_cli(env, "logs", done, "--service", "env_worker")
    assert logs.returncode == 0 and "env-worker" in logs.stdout and "==>" not in logs.stdout, logs.stdout[-2000:]
    logs = rlbus_cli(env, "logs", done, "--service", "inference-0", "-n", "5")
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr
    logs = rlbus_cli(env, "logs", done, "--service", "nope")
    assert logs.returncode == 2 and "env-worker-1" in logs.stderr and "inference-0" in logs.stderr, logs.stderr
    assert "ended with exit code 0" in rlbus_cli(env, "logs", done, "-n", "1").stdout

    # Stopped while its launcher follows it (the launcher cancels the arrays), and stopped after its
    # launcher was killed with -9 (the jobs live on: running, as SLURM says, until stop scancels them).
    for name in ("stopped", "orphaned"):
        (tmp_path / name).mkdir()
        run_id = start_run(env, run_config(tmp_path / name, tiny_model), "--max-steps", "500")
        row = wait_listed(env, run_id, lambda r: r["slurm_jobs"], "submitted", 60)
        if name == "orphaned":
            os.killpg(row["pid"], signal.SIGKILL)
            time.sleep(2.0)
            assert listed(env, run_id)["status"] == "running"
        result = rlbus_cli(env, "stop", run_id, "--timeout", "120")
        assert result.returncode == 0 and f"run {run_id} stopped" in result.stdout, (result.stdout, result.stderr)
        assert listed(env, run_id)["status"] == "stopped"
        # scancel'ed tasks pass through COMPLETING while slurmd ends their processes (seconds under load).
        tasks = wait_terminal(env, tmp_path / name / "run", timeout_s=120)
        assert tasks["orchestrator"] == tasks["trainer"] == [("0", "CANCELLED")], json.dumps(tasks)
        assert all(state in TERMINAL_STATES for rows in tasks.values() for _, state in rows), json.dumps(tasks)
        assert service_processes(tmp_path / name / "run") == []

    result = rlbus_cli(env, "delete", done)
    assert result.returncode == 0 and not run.exists(), result.stderr
    assert rlbus_cli(env, "logs", done).returncode == 2
