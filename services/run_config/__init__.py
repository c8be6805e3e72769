"""The merged run configs: ``rlbus rl``'s config (one section per service) and its ``[slurm]`` part.

This package is one of the three places that know every service (with the CLI
entry and the launcher): a service itself only knows its own config class.
"""

from rlbus.services.run_config.rl import (
    RUN_MARKER,
    SECTIONS,
    RlConfig,
    RunCheckpointConfig,
    check_cleanable,
    mark_run_folder,
    service_env,
)
from rlbus.services.run_config.slurm import SlurmConfig

__all__ = ["RUN_MARKER", "SECTIONS", "RlConfig", "RunCheckpointConfig", "SlurmConfig", "check_cleanable",
           "mark_run_folder", "service_env"]  # fmt: skip
