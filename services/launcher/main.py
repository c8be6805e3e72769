"""``rlbus rl``: entry point of the launcher."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rlbus.config.help import usage_text
from rlbus.services.entry import run_config_command
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.short import FLAG_ALIASES, rewrite_flags

SUMMARY = ("Start every service locally from one merged config; with --slurm, submit them as SLURM job "
           "arrays and follow them (--slurm-cancel cancels a run submitted from this host).")  # fmt: skip
ALIASES = {"--slurm": "--slurm.enabled", "--no-slurm": "--no-slurm.enabled", **FLAG_ALIASES}
FLAGS = {
    "--slurm": "submit the services as SLURM job arrays and follow them (--slurm.enabled; docs/slurm.md)",
    "--slurm-cancel": "cancel the SLURM run of this config's output_dir, submitted from this host, and exit",
    "--wandb / --no-wandb": "log to W&B or not (monitor.wandb.enabled); --wandb.project/.entity/.name set "
                            "monitor.wandb.* (short config keys: docs/config.md)",
    "--wandb-api-key KEY": "W&B API key (monitor.wandb.api_key; also read from WANDB_API_KEY)",
    "--ckpt": "checkpoint the trainer (trainer.ckpt.enabled; on by default through ckpt.interval)",
    "--orchestrator.prime-monitor": "stream to the Prime platform, default [prime_platform] (docs/platform.md)",
}
"""Options of ``rlbus rl`` that are not config keys: its help lists them, :func:`main` takes them."""


def main(argv: Sequence[str]) -> int:
    from rlbus.services.launcher.run import run_rl

    if "-h" in argv or "--help" in argv:
        sys.stdout.write(usage_text("rl", RlConfig, SUMMARY, FLAGS))
        return 0
    args = rewrite_flags(list(argv), ALIASES)
    if "--slurm.enabled" in args and "--dry-run" in args:
        from rlbus.services.launcher.slurm import write_job_scripts

        args = [arg for arg in args if arg != "--dry-run"]
        return run_config_command("rl", RlConfig, args, SUMMARY, run=write_job_scripts)
    if "--slurm-cancel" in args:
        from rlbus.services.launcher.slurm import cancel_slurm

        args = [arg for arg in args if arg != "--slurm-cancel"]
        return run_config_command("rl", RlConfig, args, SUMMARY, run=cancel_slurm)
    return run_config_command("rl", RlConfig, args, SUMMARY, run=run_rl)
