"""``rlbus init``: print a commented short run config (services/run_config/short.py) that runs on a CPU.

Sized like the quickstart (configs/quickstart/rl.toml): the tiny model of
``rlbus model tiny @ configs/quickstart/model.toml`` on reverse-text, float32 everywhere.
``rlbus init > rl.toml && rlbus rl @ rl.toml`` starts it; ``--model`` and ``--env`` fill in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

QUICKSTART_MODEL = "models/quickstart"
"""Where ``rlbus model tiny @ configs/quickstart/model.toml`` (scripts/quickstart.sh) writes the model."""
DEFAULT_ENV = "reverse-text"

TEMPLATE = """\
# rlbus RL run, short config (Prime's hosted RL format; full sections mix in below).
# Start it: rlbus rl @ {file}      check it first: rlbus rl @ {file} --dry-run
# Sized for a CPU like the quickstart: make the model with
#   rlbus model tiny @ configs/quickstart/model.toml     (writes models/quickstart)
# and keep vLLM's CPU KV cache small: export VLLM_CPU_KVCACHE_SPACE=1
# Every short key and the full key it sets: docs/config.md, "Short run config".
model = {model}   # a local Hugging Face model folder
output_dir = "outputs/my-run"
max_steps = 30
batch_size = 8                # examples per step (8 x 8 = 64 rollouts)
rollouts_per_example = 8      # rollouts of each example whose rewards are compared
# seq_len and inference.max_model_len are derived from the model (at most 2048 tokens).

[sampling]
max_tokens = 64               # completion tokens per turn
temperature = 1.0             # training needs a temperature above 0

[[env]]
id = {env}{env_args}

# Evaluation every 10 steps (uncomment):
# [eval]
# interval = 10
# [[eval.env]]
# id = {env}
# num_examples = 16

# W&B logging by the monitor (needs `pip install 'rlbus[monitor]'`; the key from WANDB_API_KEY):
# [wandb]
# project = "my-rl-project"

# Full sections: a CPU needs float32 (trainer and vLLM then agree) and little vLLM memory.
[inference]
dtype = "float32"
gpu_memory_utilization = 0.2

[trainer]
dtype = "float32"

[trainer.optimizer]
lr = 3e-4                     # the quickstart's: a tiny model learns at a high rate

[trainer.scheduler]
warmup_steps = 5

[orchestrator]
max_async_level = 0           # on-policy: every batch is sampled by the weights it trains
"""
REVERSE_TEXT_ARGS = "\nargs = { min_words = 1, max_words = 2 }   # short texts: a tiny model learns them"


def starter_config(model: str = QUICKSTART_MODEL, env: str = DEFAULT_ENV, file: str = "rl.toml") -> str:
    """The commented short config ``rlbus init`` prints."""
    # JSON strings are TOML basic strings: quotes and backslashes in a path stay valid.
    return TEMPLATE.format(model=json.dumps(model), env=json.dumps(env), file=file,
                           env_args=REVERSE_TEXT_ARGS if env == DEFAULT_ENV else "")  # fmt: skip


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlbus init", description="Print a commented short RL config that "
                                     "runs on a CPU; save it and start it with `rlbus rl @ FILE`.")  # fmt: skip
    parser.add_argument("--model", default=QUICKSTART_MODEL, help=f"model folder (default: {QUICKSTART_MODEL})")
    parser.add_argument("--env", default=DEFAULT_ENV, help=f"environment id (default: {DEFAULT_ENV})")
    args = parser.parse_args(list(argv))
    sys.stdout.write(starter_config(args.model, args.env))
    return 0
