"""``rlbus rl``: prepare the run folder, write each service's config, run the process table.

Run folder layout (``output_dir``)::

    configs/        rl.toml (merged) and <service>.toml, the files each service is started with
    logs/           <service>.log (each service's own log), <name>.out (each process's console
                    output: also what a crash prints before logging starts), rl.log (the launcher)
    checkpoints/    trainer and orchestrator checkpoints
    weights/        published policy weights
    metrics.jsonl   one line per service per step (the monitor), with samples.jsonl and events.jsonl
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loguru import logger

from rlbus.logging import setup_logging
from rlbus.services.entry import write_resolved
from rlbus.services.launcher.processes import CommandFor, process_table, service_command
from rlbus.services.launcher.supervisor import Supervisor
from rlbus.services.run_config import RlConfig, check_cleanable


def run_rl(config: RlConfig, command_for: CommandFor = service_command) -> int:
    """Start every service as a local process and supervise them; the launcher's exit code."""
    if config.clean_output_dir:
        clean_output_dir(config.output_dir)
        # Logging and the resolved configs were set up before the folder was cleaned: again.
        setup_logging(config.SERVICE, config.output_dir, config.log.level, config.log.json_lines)
        write_resolved(config)
        logger.info("cleaned {}", config.output_dir)
    if config.slurm.enabled:
        from rlbus.services.launcher.slurm import run_slurm

        return run_slurm(config)
    specs = process_table(config, config.output_dir / "configs")
    logs_dir = config.output_dir / "logs"
    logger.info("run folder {}: {} processes; live view: rlbus tail @ {}", config.output_dir, len(specs),
                config.output_dir / "configs" / "rl.toml")  # fmt: skip
    result = Supervisor(specs, command_for, logs_dir, config.stop_timeout_s,
                        max_restarts=config.max_restarts).run()
    return result.exit_code


def clean_output_dir(output_dir: Path) -> None:
    """Delete ``output_dir`` and make it again, refusing folders that are obviously not a run folder."""
    check_cleanable(output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
