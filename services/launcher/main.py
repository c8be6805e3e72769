"""``rlbus rl``: entry point of the launcher."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rlbus.config.help import usage_text
from rlbus.services.entry import run_config_command
from rlbus.services.run_config import RlConfig

SUMMARY = ("Start every service locally from one merged config; with --slurm, submit them as SLURM job "
           "arrays and follow them (--slurm-cancel cancels a run submitted from this host).")  # fmt: skip
ALIASES = {"--slurm": "--slurm.enabled", "--no-slurm": "--no-slurm.enabled"}
FLAGS = {
    "--slurm": "submit the services as SLURM job arrays and follow them (--slurm.enabled; docs/slurm.md)",
    "--slurm-cancel": "cancel the SLURM run of this config's output_dir, submitted from this host, and exit",
}
"""Options of ``rlbus rl`` that are not config keys: its help lists them, :func:`main` takes them."""


def main(argv: Sequence[str]) -> int:
    from rlbus.services.launcher.run import run_rl

    if "-h" in argv or "--help" in argv:
        sys.stdout.write(usage_text("rl", RlConfig, SUMMARY, FLAGS))
        return 0
    args = [ALIASES.get(arg, arg) for arg in argv]
    if "--slurm.enabled" in args and "--dry-run" in args:
        from rlbus.services.launcher.slurm import write_job_scripts

        args = [arg for arg in args if arg != "--dry-run"]
        return run_config_command("rl", RlConfig, args, SUMMARY, run=write_job_scripts)
    if "--slurm-cancel" in args:
        from rlbus.services.launcher.slurm import cancel_slurm

        args = [arg for arg in args if arg != "--slurm-cancel"]
        return run_config_command("rl", RlConfig, args, SUMMARY, run=cancel_slurm)
    return run_config_command("rl", RlConfig, args, SUMMARY, run=run_rl)
