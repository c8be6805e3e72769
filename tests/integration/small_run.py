"""The quickstart-size run the end-to-end, SLURM and multi-host tests share.

A tiny model, a few short rollouts per step: enough for every service to do its
real job in seconds per step on a CPU. The untrained model never earns
reverse-text reward; a length penalty makes rewards differ within each group,
so every step has advantages to train on.
"""

from __future__ import annotations

from rlbus.config.base import BusEndpoints
from tests.conftest import free_tcp_port

TRAINING_TOML = """
[trainer.optimizer]
lr = 1e-5

[orchestrator]
batch_size = 8
rollouts_per_example = 4
seq_len = 512
max_async_level = 0

[orchestrator.sampling]
max_tokens = 32

[orchestrator.advantage]
length_penalty = 0.5

[[orchestrator.train.env]]
id = "reverse-text"
"""
"""Trainer and orchestrator sections of the run (TOML, to paste into an rl config)."""


def loopback_endpoints() -> str:
    """The ``[bus.endpoints]`` lines: every channel on a free loopback port."""
    return "\n".join(f'{name} = "tcp://127.0.0.1:{free_tcp_port()}"' for name in BusEndpoints.model_fields)
