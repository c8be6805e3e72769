"""The real ``rlbus rl`` (``run_rl``) with every service replaced by ``fake_service``.

``python -m tests.unit.launcher.fake_run <control endpoint> [--key value ...]``: the rest
of argv is an ``rl`` config; ``--missing NAME`` gives NAME a command that cannot start.
"""

import sys

from rlbus.config import load_config
from rlbus.logging import setup_logging
from rlbus.services.launcher.processes import ProcessSpec
from rlbus.services.launcher.run import run_rl
from rlbus.services.run_config import RlConfig


def fake_command(control: str, missing: str | None, spec: ProcessSpec) -> list[str]:
    if spec.name == missing:
        return ["/nonexistent/rlbus-service"]
    return [sys.executable, "-m", "tests.unit.launcher.fake_service", control, spec.name]


def main(argv: list[str]) -> int:
    control, args = argv[0], argv[1:]
    missing = None
    if "--missing" in args:
        index = args.index("--missing")
        missing, args = args[index + 1], args[:index] + args[index + 2:]
    config = load_config(RlConfig, args, env={})
    setup_logging("rl", config.output_dir)
    return run_rl(config, command_for=lambda spec: fake_command(control, missing, spec))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
