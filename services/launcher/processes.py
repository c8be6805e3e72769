"""The launcher's process table: which services run, with which command, and how a child is kept.

Every child runs exactly the command a user would type on another host
(``python -m rlbus <service> @ <output_dir>/configs/<service>.toml``).
Each gets its own process group, so the launcher can stop a service together
with anything it spawned (vLLM's engine; a trainer's ranks are stopped by the
trainer's rank group, rlbus.ranks), and on Linux a parent-death signal, so a
launcher killed with -9 leaves no service behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from rlbus.ranks import parent_death_signal
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.placement import (
    inference_process_name,
    num_inference_replicas,
    placement_environments,
    weight_relay_args,
)
from rlbus.services.run_config.weight_group import weight_group_args

CleanExit = Literal["done", "finished", "failure"]
"""What exit code 0 of a service means: the run is done (orchestrator), this service's part is
done and the run goes on (trainer after its last step), or a failure (a server that should not stop)."""


@dataclass(frozen=True)
class ProcessSpec:
    """One process the launcher starts."""

    name: str
    """Unique name, also of its output file: ``monitor``, ``env-worker-0``."""
    service: str
    """The ``rlbus`` command it runs."""
    config_path: Path
    args: tuple[str, ...] = ()
    """Flags after the config file, e.g. ``--worker-id env-worker-0``."""
    clean_exit: CleanExit = "failure"
    to_console: bool = False
    """Write its output to the launcher's console instead of ``logs/<name>.out`` (the monitor: its
    console is the run's progress)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables set for this process over the launcher's environment: ``CUDA_VISIBLE_DEVICES`` of
    an inference replica or the trainer (services/run_config/placement.py)."""


CommandFor = Callable[[ProcessSpec], list[str]]
"""ProcessSpec -> argv; tests replace it with trivial commands."""


def service_command(spec: ProcessSpec) -> list[str]:
    """The command a user would run by hand for ``spec``."""
    return [sys.executable, "-m", "rlbus", spec.service, "@", str(spec.config_path), *spec.args]


def process_table(config: RlConfig, config_dir: Path, environ: Mapping[str, str] | None = None) -> list[ProcessSpec]:
    """Every process of a local run, in start order: the monitor first, so no early telemetry waits long.

    One inference replica per GPU group of ``inference_gpu_ids`` (one without), each on its own port
    (and in the weight fan-out tree of ``inference.weights_fanout``, or the trainer's weight group
    with ``trainer.weight_transport = "collective"``);
    the trainer is one process that starts its ``trainer.num_ranks`` ranks itself (:mod:`rlbus.ranks`),
    and none with ``[shared_trainer]``: a trainer started by itself trains the run.
    ``environ`` (the launcher's, by default) tells which GPUs the ids name."""
    envs = placement_environments(config, os.environ if environ is None else environ)
    specs = [ProcessSpec("monitor", "monitor", config_dir / "monitor.toml", to_console=True)]
    num_replicas = num_inference_replicas(config)
    for index in range(num_replicas):
        name = inference_process_name(index, num_replicas)
        args = () if num_replicas == 1 else ("--port", str(config.inference.port + index), "--replica-id", name)
        args += weight_relay_args(config, index, num_replicas) + weight_group_args(config, index)
        specs.append(ProcessSpec(name, "inference", config_dir / "inference.toml", args, env=envs.get(name, {})))
    if config.shared_trainer is None:  # else a trainer started by itself trains this run (and others)
        specs.append(ProcessSpec("trainer", "trainer", config_dir / "trainer.toml", clean_exit="finished",
                                 env=envs.get("trainer", {})))  # fmt: skip
    specs.append(ProcessSpec("orchestrator", "orchestrator", config_dir / "orchestrator.toml", clean_exit="done"))
    for index in range(config.num_env_workers):
        name = f"env-worker-{index}"
        specs.append(ProcessSpec(name, "env-worker", config_dir / "env-worker.toml", ("--worker-id", name)))
    return specs


class Child:
    """A started service process, the leader of its own process group."""

    def __init__(self, spec: ProcessSpec, popen: subprocess.Popen, logs_dir: Path) -> None:
        self.spec, self.popen = spec, popen
        self.output_path = None if spec.to_console else logs_dir / f"{spec.name}.out"
        self.service_log = logs_dir / f"{spec.service}.log"
        """The service's own log file (``rlbus.logging``)."""
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @classmethod
    def start(cls, spec: ProcessSpec, argv: list[str], logs_dir: Path, env: dict[str, str] | None = None) -> Child:
        output_path = None if spec.to_console else logs_dir / f"{spec.name}.out"
        output: IO[bytes] | None = output_path.open("ab") if output_path else None
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT if output else None,
                env={**(os.environ if env is None else env), **spec.env, "PYTHONUNBUFFERED": "1"},
                start_new_session=True, preexec_fn=parent_death_signal(),
            )  # fmt: skip
        finally:
            if output is not None:
                output.close()  # the child holds its own copy
        return cls(spec, popen, logs_dir)

    def poll(self) -> int | None:
        """The exit code once the process ended (negative: killed by that signal), else None."""
        if self.exit_code is None:
            self.exit_code = self.popen.poll()
        return self.exit_code

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the service and everything in its process group."""
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group is gone already

    def tail(self, num_lines: int) -> list[str]:
        """The last lines of its output file, or of its service log when its output went to the console."""
        path = self.output_path or self.service_log
        try:
            with path.open("rb") as handle:
                handle.seek(max(0, path.stat().st_size - 64 * 1024))
                text = handle.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return text.splitlines()[-num_lines:]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
