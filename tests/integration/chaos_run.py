"""Chaos runs: start every service of an ``rl`` config as the user would, kill -9 one, restart it.

Each service runs with exactly the command a user types (``rlbus <service> @
<output_dir>/configs/<service>.toml``, written by ``rlbus rl --dry-run``); a killed
service is started again with the same command. :class:`ChaosRun` measures how long
the run took to recover and :func:`audit` checks, from the files the services leave
behind, that nothing was lost or trained twice:

- trainer steps: the trainer's rows of the monitor's ``metrics.jsonl`` (one per trained step
  and trainer process; a step trained twice shows twice) and the orchestrator journal's
  ``acked`` records (a step is acknowledged only once trained and checkpointed) must cover
  1..max_steps, each step trained exactly once. Typed records only: no log text is parsed;
- batches: the orchestrator's journal (:mod:`rlbus.services.orchestrator.journal`) says which
  groups each step was built from; no group may be in two steps;
- rollouts: every rollout id of an ``accepted`` journal record must be in a step that
  was trained, dropped as stale (counted, by design), or still buffered at the end.

Used by ``tests/integration/test_chaos.py`` and ``scripts/chaos.py``: a test harness, so it
may read every service's files (the journal through the orchestrator's own reader).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from loguru import logger

from rlbus.config import load_config
from rlbus.config.base import BusEndpoints
from rlbus.ports import free_loopback_port
from rlbus.services.launcher.processes import Child, ProcessSpec, process_table, service_command
from rlbus.services.orchestrator.journal import read_history
from rlbus.services.run_config import RlConfig

POLL_S = 0.5


class ChaosFailure(RuntimeError):
    """The run did not do what a chaos run expects (named in the text)."""


@dataclass
class Recovery:
    """One kill -9 and what followed."""

    name: str
    kill_step: int
    """Trainer step (last checkpoint) when the service was killed."""
    ready_s: float = float("nan")
    """Kill -> the restarted service was ready (inference: /health 200; env-worker: its first accepted
    result; orchestrator: it replayed its journal; monitor: it wrote a metrics line; trainer: at once)."""
    recovery_s: float = float("nan")
    """Kill -> the first trainer step completed after the restarted service was ready."""


@dataclass
class Audit:
    """What the run's files say about exactly-once training (see the module docstring)."""

    trained_steps: list[int]
    max_steps: int
    num_accepted: int
    duplicate_steps: list[int] = field(default_factory=list)
    """Steps the trainer reported (metrics.jsonl) more than once."""
    skipped_steps: list[int] = field(default_factory=list)
    groups_in_two_steps: list[str] = field(default_factory=list)
    lost_rollouts: list[str] = field(default_factory=list)
    num_stale: int = 0
    num_left_over: int = 0

    @property
    def contiguous(self) -> bool:
        return sorted(set(self.trained_steps)) == list(range(1, self.max_steps + 1))

    @property
    def ok(self) -> bool:
        return self.contiguous and not (self.duplicate_steps or self.skipped_steps or self.groups_in_two_steps
                                        or self.lost_rollouts)  # fmt: skip


class ChaosRun:
    """The services of one ``rl`` config, started, killed and restarted one by one."""

    def __init__(self, config_path: Path, args: tuple[str, ...] = (), timeout_s: float = 600.0) -> None:
        argv = ["@", str(config_path), *args]
        subprocess.run([sys.executable, "-m", "rlbus", "rl", *argv, "--dry-run"], check=True,
                       capture_output=True)  # fmt: skip
        self.config = load_config(RlConfig, argv)
        self.output_dir = self.config.output_dir
        self.logs_dir = self.output_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.specs = {spec.name: spec for spec in process_table(self.config, self.output_dir / "configs")}
        self.children: dict[str, Child] = {}
        self.timeout_s = timeout_s
        self.recoveries: list[Recovery] = []
        self.ports: dict[str, int] = {}
        """Inference replicas started on another port than the config's."""

    # ------------------------------------------------------------- processes

    def start(self, name: str) -> Child:
        spec = ProcessSpec(**{**self.specs[name].__dict__, "to_console": False})  # every output to a file
        child = Child.start(spec, service_command(spec), self.logs_dir)
        self.children[name] = child
        logger.info("chaos: started {} (pid {})", name, child.pid)
        return child

    def join_env_worker(self, name: str) -> Child:
        """Start one more env-worker mid-run, with the command a user would type for it."""
        self.specs[name] = ProcessSpec(name, "env-worker", self.output_dir / "configs" / "env-worker.toml",
                                       ("--worker-id", name))  # fmt: skip
        return self.start(name)

    def join_inference(self, name: str, port: int) -> Child:
        """Start one more inference replica mid-run on ``port`` (env-workers must list its URL)."""
        self.specs[name] = ProcessSpec(name, "inference", self.output_dir / "configs" / "inference.toml",
                                       ("--port", str(port), "--replica-id", name))  # fmt: skip
        self.ports[name] = port
        return self.start(name)

    def inference_url(self, name: str) -> str:
        return f"http://{self.config.inference.host}:{self.ports.get(name, self.config.inference.port)}"

    def start_all(self) -> None:
        for name in self.specs:
            self.start(name)

    def kill(self, name: str) -> None:
        child = self.children[name]
        child.signal_group(signal.SIGKILL)
        child.popen.wait()
        logger.info("chaos: killed {} (pid {}) with SIGKILL", name, child.pid)

    def stop_all(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in self.children.values():
            try:
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            child.signal_group(signal.SIGKILL)
            child.popen.wait()

    # -------------------------------------------------------------- progress

    def metrics(self) -> list[dict]:
        """The monitor's metrics.jsonl rows (a line still being written is left for the next read)."""
        path = self.output_dir / "metrics.jsonl"
        if not path.exists():
            return []
        text = path.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]

    def trainer_steps(self) -> list[int]:
        """Every step a trainer process reported as trained (its ``loss/mean`` row), in file order."""
        return [row["step"] for row in self.metrics() if row["service"] == "trainer" and "loss/mean" in row]

    def acked_steps(self) -> set[int]:
        """Steps the orchestrator journaled as acknowledged: trained and checkpointed."""
        return {r["step"] for r in self.journal() if r["kind"] == "acked"}

    def trainer_step(self) -> int:
        return max([*self.trainer_steps(), *self.acked_steps()], default=0)

    def journal(self) -> list[dict]:
        return read_history(self.output_dir / "checkpoints" / "orchestrator" / "journal.jsonl")

    def wait_until(self, done: Callable[[], bool], what: str, timeout_s: float | None = None) -> float:
        """Poll ``done`` until true; the monotonic time it became true. Fails when a service died."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while not done():
            self._check_alive()
            if time.monotonic() > deadline:
                raise ChaosFailure(f"timed out after {timeout_s or self.timeout_s:.0f}s waiting for {what} "
                                   f"(trainer at step {self.trainer_step()})")  # fmt: skip
            time.sleep(POLL_S)  # polling files and /health of other processes, not a synchronisation
        return time.monotonic()

    def wait_during_run(self, done: Callable[[], bool], what: str) -> float:
        """:meth:`wait_until`, failing at once when the run ends first: after the last step
        nothing that is waited for here can happen any more."""
        orchestrator = self.children["orchestrator"]

        def done_or_run_over() -> bool:
            if done():
                return True
            if orchestrator.poll() is not None:
                raise ChaosFailure(f"the run ended (trainer at step {self.trainer_step()} of "
                                   f"{self.config.max_steps}) before {what}: kill earlier or raise max_steps")  # fmt: skip
            return False

        return self.wait_until(done_or_run_over, what)

    def _check_alive(self) -> None:
        for name, child in self.children.items():
            code = child.poll()
            if code is not None and not (code == 0 and child.spec.clean_exit != "failure"):
                tail = "\n".join(child.tail(30))
                raise ChaosFailure(f"{name} exited with {code}; last lines of its output:\n{tail}")

    def wait_for_step(self, step: int) -> None:
        self.wait_until(lambda: self.trainer_step() >= step, f"trainer step {step}")

    def wait_for_end(self) -> None:
        orchestrator = self.children["orchestrator"]
        self.wait_until(lambda: orchestrator.poll() is not None, "the orchestrator to finish the run")
        if orchestrator.exit_code != 0:
            raise ChaosFailure(f"the orchestrator exited with {orchestrator.exit_code}")
        trainer = self.children["trainer"]
        self.wait_until(lambda: trainer.poll() is not None, "the trainer to finish its last step", 120)

    # ----------------------------------------------------------------- chaos

    def kill_and_restart(self, name: str) -> Recovery:
        """kill -9 ``name``, start it again with the same command, time its recovery."""
        recovery = Recovery(name, self.trainer_step())
        killed_at = time.monotonic()
        self.kill(name)
        restarted_at = time.time()
        self.start(name)
        ready_at = self.wait_during_run(lambda: self._ready(name, restarted_at), f"{name} to be ready again")
        step_at_ready = self.trainer_step()
        progressed_at = self.wait_during_run(lambda: self.trainer_step() > step_at_ready,
                                             f"a trainer step after {name} came back")  # fmt: skip
        recovery.ready_s, recovery.recovery_s = ready_at - killed_at, progressed_at - killed_at
        logger.info("chaos: {} (killed at trainer step {}) ready after {:.1f}s, run progressing after {:.1f}s", name,
                    recovery.kill_step, recovery.ready_s, recovery.recovery_s)  # fmt: skip
        self.recoveries.append(recovery)
        return recovery

    def _ready(self, name: str, since: float) -> bool:
        service = self.specs[name].service
        if service == "inference":
            try:
                return httpx.get(self.inference_url(name) + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        if service == "env-worker":
            return any(r["kind"] == "accepted" and r["time"] > since and r["result"]["worker_id"] == name
                       for r in self.journal())  # fmt: skip
        if service == "orchestrator":
            return any(r["kind"] == "resumed" and r["time"] > since for r in self.journal())
        if service == "monitor":
            return any(row.get("time", 0) > since for row in self.metrics()[-50:])
        return True


def requests_served(url: str) -> float:
    """Requests a vLLM replica finished, from its Prometheus ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))  # fmt: skip


def accepted_by(run: ChaosRun, worker_id: str) -> int:
    """Results of ``worker_id`` the orchestrator accepted."""
    return sum(1 for r in run.journal() if r["kind"] == "accepted" and r["result"]["worker_id"] == worker_id)


def audit(run: ChaosRun) -> Audit:
    """Exactly-once checks over the monitor's metrics and the orchestrator's journal."""
    max_steps = run.config.max_steps or 0
    steps = run.trainer_steps()
    counts = Counter(steps)
    # A report lost with a killed process still leaves the step's acknowledgement in the journal.
    trained = set(steps) | run.acked_steps()
    records = run.journal()
    rollouts_of = {r["result"]["task_id"]: [x["rollout_id"] for x in r["result"]["rollouts"]]
                   for r in records if r["kind"] == "accepted"}  # fmt: skip
    num_accepted = sum(len(ids) for ids in rollouts_of.values())
    built = {r["step"]: r["task_ids"] for r in records if r["kind"] == "built" and r["step"] <= max_steps}
    in_steps = Counter(t for task_ids in built.values() for t in task_ids)
    stale = {t for r in records if r["kind"] == "dropped" for t in r["task_ids"]}
    left = {t for r in records if r["kind"] == "finished" for t in r["task_ids"]}
    accounted = set(in_steps) | stale | left
    lost = [rid for task_id, ids in rollouts_of.items() if task_id not in accounted for rid in ids]
    return Audit(
        trained_steps=sorted(trained), max_steps=max_steps, num_accepted=num_accepted,
        duplicate_steps=sorted(s for s, n in counts.items() if n > 1),
        skipped_steps=[s for s in range(1, max_steps + 1) if s not in trained],
        groups_in_two_steps=sorted(t for t, n in in_steps.items() if n > 1), lost_rollouts=lost,
        num_stale=sum(len(rollouts_of.get(t, [])) for t in stale),
        num_left_over=sum(len(rollouts_of.get(t, [])) for t in left),
    )  # fmt: skip


def write_config(folder: Path, model: Path, max_steps: int, num_env_workers: int = 2,
                 extra_inference_port: int | None = None) -> Path:
    """A quickstart-size ``rl`` config on free local ports: checkpoints every step, resume from the latest.
    With ``extra_inference_port``, env-workers also list a replica there (started later, or never)."""
    inference_port = free_loopback_port()
    urls = [f"http://127.0.0.1:{port}/v1" for port in (inference_port, extra_inference_port) if port]
    endpoints = "\n".join(f'{name} = "tcp://127.0.0.1:{free_loopback_port()}"' for name in BusEndpoints.model_fields)
    path = folder / "rl.toml"
    path.write_text(f"""
model = "{model}"
output_dir = "{folder / 'run'}"
max_steps = {max_steps}
num_env_workers = {num_env_workers}

[ckpt]
interval = 1
resume_step = -1

[bus.endpoints]
{endpoints}

[inference]
port = {inference_port}
max_model_len = 512
gpu_memory_utilization = 0.2

[trainer.optimizer]
lr = 1e-5

[orchestrator]
batch_size = 8
rollouts_per_example = 4
seq_len = 512
max_async_level = 1
task_lease_s = 120

[orchestrator.sampling]
max_tokens = 32

# The untrained model never earns reverse-text reward; a length penalty makes rewards differ.
[orchestrator.advantage]
length_penalty = 0.5

[[orchestrator.train.env]]
id = "reverse-text"

[env_worker]
inference_urls = {json.dumps(urls)}
max_retries = 8
max_backoff_s = 5.0

[monitor]
console = false
""")
    return path
