"""Chaos runs: start every service of an ``rl`` config as the user would, kill -9 one, restart it.

Each service runs with exactly the command a user types (``rlbus <service> @
<output_dir>/configs/<service>.toml``, written by ``rlbus rl --dry-run``); a killed
service is started again with the same command. Two kinds of kill:

- timed: :meth:`ChaosRun.kill_and_restart` sends SIGKILL from outside, wherever the service is;
- at a fault point: :meth:`ChaosRun.arm` names points of ``rlbus.faults`` (``RLBUS_FAULT_POINTS``)
  for the service's next start; the service kills itself there, inside a write -> rename -> ack
  window that a kill from outside would almost never hit. The harness notices the death while it
  waits for anything, and starts the service again (with its next armed points, if any).

:class:`ChaosRun` measures how long each recovery took. Every service runs with
``RLBUS_AUDIT_DIR=<output_dir>/audit``: :mod:`tests.integration.chaos_audit` checks from those
trails, not from the orchestrator's journal under test, that nothing was lost or trained twice.

Used by ``tests/integration/test_chaos.py`` and ``scripts/chaos.py``: a test harness, so it
may read every service's files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from loguru import logger

from rlbus import audit as audit_trail
from rlbus import faults
from rlbus.config import load_config
from rlbus.config.base import BusEndpoints
from rlbus.ports import free_loopback_port
from rlbus.services.launcher.processes import Child, ProcessSpec, process_table, service_command
from rlbus.services.orchestrator.journal import read_history
from rlbus.services.run_config import RlConfig
from tests.integration.chaos_audit import Audit, trainer_records, worker_records
from tests.integration.chaos_audit import audit as audit_trails

POLL_S = 0.5


class ChaosFailure(RuntimeError):
    """The run did not do what a chaos run expects (named in the text)."""


@dataclass
class Recovery:
    """One kill -9 and what followed."""

    name: str
    kill_step: int
    """Trainer step (last recorded) when the service was killed."""
    how: str = "timed"
    """``timed`` (SIGKILL from the harness) or the fault point the service killed itself at."""
    ready_s: float = float("nan")
    """Kill -> the restarted service was ready (inference: /health 200; env-worker: its first accepted
    result; orchestrator: it replayed its journal; monitor: it wrote a metrics line; trainer: at once).
    A death at a fault point is seen at the harness's next poll (up to ``POLL_S`` late)."""
    recovery_s: float = float("nan")
    """Kill -> the first trainer step completed after the restarted service was ready."""
    killed_at: float = 0.0
    restarted_at: float = 0.0
    step_at_ready: int = -1

    @property
    def done(self) -> bool:
        return self.recovery_s == self.recovery_s  # not NaN


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
        self.audit_dir = self.output_dir / "audit"
        self.specs = {spec.name: spec for spec in process_table(self.config, self.output_dir / "configs")}
        self.children: dict[str, Child] = {}
        self.timeout_s = timeout_s
        self.recoveries: list[Recovery] = []
        self.ports: dict[str, int] = {}
        """Inference replicas started on another port than the config's."""
        self.faults: dict[str, list[str]] = {}
        """Process name -> ``RLBUS_FAULT_POINTS`` of its next starts, one per start."""
        self.armed: dict[str, str] = {}
        """Process name -> the fault points its running process was started with."""

    # ------------------------------------------------------------- processes

    def arm(self, name: str, *specs: str) -> None:
        """The next starts of ``name`` run with these fault points (``rlbus.faults``), one spec a start."""
        for spec in specs:
            faults.parse(spec)  # a typo fails here, not as a service that never dies
        self.faults.setdefault(name, []).extend(specs)

    def start(self, name: str) -> Child:
        spec = ProcessSpec(**{**self.specs[name].__dict__, "to_console": False})  # every output to a file
        env = {**os.environ, audit_trail.ENV_VAR: str(self.audit_dir)}
        env.pop(faults.ENV_VAR, None)
        self.armed.pop(name, None)
        if self.faults.get(name):
            env[faults.ENV_VAR] = self.armed[name] = self.faults[name].pop(0)
        child = Child.start(spec, service_command(spec), self.logs_dir, env)
        self.children[name] = child
        logger.info("chaos: started {} (pid {}){}", name, child.pid,
                    f" armed with {self.armed[name]}" if name in self.armed else "")  # fmt: skip
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
        if name in self.armed:  # killed from outside before its fault point: armed again on restart
            self.faults.setdefault(name, []).insert(0, self.armed.pop(name))
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
        """Every step the trainer recorded in its audit trail (once checkpointed, before its ack)."""
        return [r["step"] for r in trainer_records(self.audit_dir)]

    def trainer_step(self) -> int:
        return max(self.trainer_steps(), default=0)

    def journal_path(self) -> Path:
        return self.output_dir / "checkpoints" / "orchestrator" / "journal.jsonl"

    def journal(self) -> list[dict]:
        return read_history(self.journal_path())

    def wait_until(self, done: Callable[[], bool], what: str, timeout_s: float | None = None) -> float:
        """Poll ``done`` until true; the monotonic time it became true. Services that died at a
        fault point are started again meanwhile; fails when a service died otherwise."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            self._supervise()
            if done():
                return time.monotonic()
            self._check_alive()
            if time.monotonic() > deadline:
                raise ChaosFailure(f"timed out after {timeout_s or self.timeout_s:.0f}s waiting for {what} "
                                   f"(trainer at step {self.trainer_step()})")  # fmt: skip
            time.sleep(POLL_S)  # polling files and /health of other processes, not a synchronisation

    def wait_during_run(self, done: Callable[[], bool], what: str) -> float:
        """:meth:`wait_until`, failing at once when the run ends first: after the last step
        nothing that is waited for here can happen any more."""

        def done_or_run_over() -> bool:
            if done():
                return True
            if self.children["orchestrator"].poll() == 0:
                raise ChaosFailure(f"the run ended (trainer at step {self.trainer_step()} of "
                                   f"{self.config.max_steps}) before {what}: kill earlier or raise max_steps")  # fmt: skip
            return False

        return self.wait_until(done_or_run_over, what)

    def _check_alive(self) -> None:
        for name, child in self.children.items():
            code = child.poll()
            if code == -signal.SIGKILL and name in self.armed:
                continue  # died at its fault point: restarted at the next poll
            if code is not None and not (code == 0 and child.spec.clean_exit != "failure"):
                tail = "\n".join(child.tail(30))
                raise ChaosFailure(f"{name} exited with {code}; last lines of its output:\n{tail}")

    def wait_for_step(self, step: int) -> None:
        self.wait_until(lambda: self.trainer_step() >= step, f"trainer step {step}")

    def wait_for_end(self) -> None:
        """Wait for the run to finish; fails if an armed fault point was never reached."""
        self.wait_until(lambda: self.children["orchestrator"].poll() == 0, "the orchestrator to finish the run")
        trainer = self.children["trainer"]
        self.wait_until(lambda: trainer.poll() is not None, "the trainer to finish its last step", 120)
        unfired = {name: [spec for spec in [self.armed.get(name), *self.faults.get(name, [])] if spec]
                   for name in self.specs}  # fmt: skip
        unfired = {name: specs for name, specs in unfired.items() if specs}
        if unfired:
            raise ChaosFailure(f"fault points never reached before the run ended: {unfired}")

    # ----------------------------------------------------------------- chaos

    def kill_and_restart(self, name: str) -> Recovery:
        """kill -9 ``name``, start it again with the same command, wait for its recovery."""
        recovery = Recovery(name, self.trainer_step(), killed_at=time.monotonic())
        self.kill(name)
        self._restart(recovery)
        self.wait_during_run(lambda: recovery.done, f"{name} to recover")
        return recovery

    def _restart(self, recovery: Recovery) -> None:
        recovery.restarted_at = time.time()
        self.start(recovery.name)
        self.recoveries.append(recovery)

    def _supervise(self) -> None:
        """Start again what died at its fault point; move the recoveries under way along."""
        for name, child in list(self.children.items()):
            if name in self.armed and child.poll() == -signal.SIGKILL:
                point = self.armed[name]
                logger.info("chaos: {} (pid {}) died at fault point {}", name, child.pid, point)
                child.signal_group(signal.SIGKILL)  # what it started dies with it
                self._restart(Recovery(name, self.trainer_step(), how=point, killed_at=time.monotonic()))
        for recovery in self.recoveries:
            if recovery.done:
                continue
            now = time.monotonic()
            if recovery.step_at_ready < 0 and self._ready(recovery.name, recovery.restarted_at):
                recovery.ready_s, recovery.step_at_ready = now - recovery.killed_at, self.trainer_step()
            elif recovery.step_at_ready >= 0 and self.trainer_step() > recovery.step_at_ready:
                recovery.recovery_s = now - recovery.killed_at
                logger.info("chaos: {} (killed at trainer step {}, {}) ready after {:.1f}s, run progressing "
                            "after {:.1f}s", recovery.name, recovery.kill_step, recovery.how, recovery.ready_s,
                            recovery.recovery_s)  # fmt: skip

    def _ready(self, name: str, since: float) -> bool:
        service = self.specs[name].service
        if service == "inference":
            try:
                return httpx.get(self.inference_url(name) + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        if service == "env-worker":
            return any(r["accepted"] and r["time"] > since and r["worker_id"] == name
                       for r in worker_records(self.audit_dir))  # fmt: skip
        if service == "orchestrator":
            return any(r["kind"] == "resumed" and r["time"] > since for r in self.journal())
        if service == "monitor":
            return any(row.get("time", 0) > since for row in self.metrics()[-50:])
        return True

    def audit(self) -> Audit:
        return audit_trails(self.audit_dir, self.journal_path(), self.config.max_steps or 0)


def requests_served(url: str) -> float:
    """Requests a vLLM replica finished, from its Prometheus ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))  # fmt: skip


def accepted_by(run: ChaosRun, worker_id: str) -> int:
    """Results of ``worker_id`` the orchestrator accepted (from the worker's audit trail)."""
    return sum(1 for r in worker_records(run.audit_dir) if r["accepted"] and r["worker_id"] == worker_id)


def audit(run: ChaosRun) -> Audit:
    """The exactly-once audit of the run (:mod:`tests.integration.chaos_audit`)."""
    return run.audit()


def write_config(
    folder: Path,
    model: Path,
    max_steps: int,
    num_env_workers: int = 2,
    extra_inference_port: int | None = None,
    max_async_level: int = 1,
) -> Path:
    """A quickstart-size ``rl`` config on free local ports: checkpoints every step, resume from the latest.
    With ``extra_inference_port``, env-workers also list a replica there (started later, or never)."""
    inference_port = free_loopback_port()
    urls = [f"http://127.0.0.1:{port}/v1" for port in (inference_port, extra_inference_port) if port]
    endpoints = "\n".join(f'{name} = "tcp://127.0.0.1:{free_loopback_port()}"' for name in BusEndpoints.model_fields)
    path = folder / "rl.toml"
    path.write_text(f"""
model = "{model}"
output_dir = "{folder / "run"}"
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
max_async_level = {max_async_level}
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
