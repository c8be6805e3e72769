"""The shared entry of every config-driven command.

Parse and validate the config (exit 2 on any mistake, before anything
starts), honour ``--help`` and ``--dry-run``, set up logging, write the
resolved config next to the logs, then run the service.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from loguru import logger

from common.config import ConfigError, ServiceConfig, load_config, write_toml
from common.config.help import usage_text
from common.logging import setup_logging

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_NOT_BUILT = 0, 1, 2, 3


def run_config_command(
    command: str,
    cls: type[ServiceConfig],
    argv: Sequence[str],
    summary: str,
    run: Callable[[Any], int] | None,
    env: dict[str, Any] | None = None,
) -> int:
    """Run ``rlbus <command>``; ``run`` is None for commands not built yet."""
    args = list(argv)
    if "-h" in args or "--help" in args:
        sys.stdout.write(usage_text(command, cls, summary))
        return EXIT_OK
    dry_run = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    try:
        if env is None:
            from services.launcher.config import service_env

            env = service_env(_section_of(cls), os.environ)
        config = load_config(cls, args, env=env)
    except ConfigError as exc:
        sys.stderr.write(f"rlbus {command}: {exc}\n")
        return EXIT_CONFIG
    if dry_run:
        for path in write_resolved(config):
            sys.stdout.write(f"{path}\n")
        return EXIT_OK
    if run is None:
        sys.stderr.write(f"rlbus {command}: the config is valid, but this command is not built yet\n")
        return EXIT_NOT_BUILT
    setup_logging(cls.SERVICE, config.output_dir, config.log.level, config.log.json_lines)
    write_resolved(config)
    try:
        return run(config)
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130
    except Exception:
        logger.exception(f"{command} failed")
        return EXIT_FAILED


def write_resolved(config: ServiceConfig) -> list:
    """Write ``<output_dir>/configs/<service>.toml`` for every resolved config."""
    folder = config.output_dir / "configs"
    return [write_toml(cfg, folder / f"{stem}.toml") for stem, cfg in config.resolved_configs().items()]


def _section_of(cls: type[ServiceConfig]) -> str | None:
    from services.launcher.config import SECTIONS

    return next((name for name, section in SECTIONS.items() if section is cls), None)
