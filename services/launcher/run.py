"""``rlbus rl``: prepare the run folder, write each service's config, run the process table.

Run folder layout (``output_dir``)::

    configs/        rl.toml (merged) and <service>.toml, the files each service is started with
    logs/           <service>.log (each service's own log), <name>.out (each process's console
                    output: also what a crash prints before logging starts), rl.log (the launcher)
    checkpoints/    trainer and orchestrator checkpoints
    weights/        published policy weights
    metrics.jsonl   one line per service report (the monitor), with samples.jsonl and events.jsonl
    steps.jsonl     one line per step, every service's figures of it (the monitor)
    charts/         PNG charts of steps.jsonl, drawn by the monitor as it stops (rlbus.plots)

When the run ends the launcher logs a summary: steps, rewards, last evaluation, wall time and
where the results are (:mod:`rlbus.services.launcher.summary`); with ``--bench`` it also prints
the table of throughput figures (:mod:`rlbus.bench`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from loguru import logger

from rlbus.bench import RL_BENCH, print_bench_table
from rlbus.config.base import secret_paths
from rlbus.config.loader import ENV_PREFIX
from rlbus.prime_platform import LAUNCHER_PID_VARIABLE
from rlbus.run_files import STEPS_FILE, read_rows
from rlbus.services.entry import open_run_folder
from rlbus.services.launcher.platform import start_platform_run
from rlbus.services.launcher.processes import CommandFor, process_table, service_command
from rlbus.services.launcher.summary import log_run_summary
from rlbus.services.launcher.supervisor import RunResult, Supervisor
from rlbus.services.run_config import RlConfig, check_cleanable


def run_rl(config: RlConfig, command_for: CommandFor = service_command) -> int:
    """Start every service as a local process and supervise them; the launcher's exit code."""
    if config.clean_output_dir:
        clean_output_dir(config.output_dir)
        # Logging, the resolved configs and the marker were set up before the folder was cleaned: again.
        open_run_folder(config)
        logger.info("cleaned {}", config.output_dir)
    if config.bench:
        logger.info("bench mode: {} steps with W&B, checkpoints, resuming and evaluation off; the table of "
                    "figures comes at the end", config.max_steps)  # fmt: skip
    platform = start_platform_run(config, os.environ)  # before anything starts: no key, no run
    result: RunResult | None = None
    try:
        result = run_services(config, command_for)
    finally:
        if platform is not None:  # every service stopped: the monitor's last uploads went first
            platform.finish(result)
    return with_bench_table(config, result.exit_code)


def run_services(config: RlConfig, command_for: CommandFor) -> RunResult:
    """Run every service locally (or as SLURM arrays) until the run ends; how it ended."""
    if config.slurm.enabled:
        from rlbus.services.launcher.slurm import run_slurm

        return run_slurm(config)
    specs = process_table(config, config.output_dir / "configs")
    logs_dir = config.output_dir / "logs"
    logger.info("run folder {}: {} processes; live view: rlbus tail @ {}", config.output_dir, len(specs),
                config.output_dir / "configs" / "rl.toml")  # fmt: skip
    started = time.monotonic()
    # The launcher's pid: a monitor that outlives it (kill -9) marks the platform run itself.
    env = {**child_environment(config, os.environ), LAUNCHER_PID_VARIABLE: str(os.getpid())}
    result = Supervisor(specs, command_for, logs_dir, config.stop_timeout_s, env=env,
                        max_restarts=config.max_restarts).run()  # fmt: skip
    log_run_summary(config.output_dir, time.monotonic() - started)
    return result


def with_bench_table(config: RlConfig, exit_code: int) -> int:
    """Under ``--bench``, print the table of the run's steps (steps.jsonl, complete once the monitor
    stopped); ``exit_code`` either way. A failed run gets the table of the steps it finished."""
    if config.bench:
        print_bench_table(read_rows(config.output_dir / STEPS_FILE), RL_BENCH)
    return exit_code


def child_environment(config: RlConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` plus each secret of ``config`` as its ``RLBUS_<SECTION>__<KEY>`` variable: the
    children's config files hold secrets redacted, and take them from there."""
    env = dict(environ)
    for path in secret_paths(RlConfig):
        value = config
        for part in path:
            value = getattr(value, part, None)  # None below an optional section that is not set
        if value is not None:
            env[ENV_PREFIX + "__".join(path).upper()] = value
    return env


def clean_output_dir(output_dir: Path) -> None:
    """Delete ``output_dir`` and make it again, refusing folders that are obviously not a run folder."""
    check_cleanable(output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
