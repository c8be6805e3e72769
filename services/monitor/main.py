"""``rlbus monitor`` and ``rlbus tail``: entry points."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from common.config import ConfigError, deep_merge, parse_argv, read_toml
from common.config.errors import format_validation_error
from common.config.help import usage_text
from common.logging import setup_logging
from services.entry import EXIT_CONFIG, EXIT_OK, run_config_command
from services.monitor.config import MonitorConfig, TailConfig

TAIL_SUMMARY = "Live view of a running job: latest step's metrics, service health, new log lines."
# --json is what users type; the field is json_lines because pydantic models already have .json().
TAIL_ALIASES = {"--json": "--json-lines", "--no-json": "--no-json-lines", "--monitor": "--monitor-address"}


def main(argv: Sequence[str]) -> int:
    from services.monitor.service import run_monitor

    return run_config_command("monitor", MonitorConfig, argv, "Collect telemetry from every service.",
                              run=run_monitor)  # fmt: skip


def tail_main(argv: Sequence[str]) -> int:
    args = [_alias(arg) for arg in argv]
    if "-h" in args or "--help" in args:
        text = usage_text("tail", TailConfig, TAIL_SUMMARY).replace(" [--dry-run]", "")
        sys.stdout.write("\n".join(line for line in text.splitlines() if "--dry-run" not in line) + "\n")
        return EXIT_OK
    try:
        config = load_tail_config(args, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"rlbus tail: {exc}\n")
        return EXIT_CONFIG
    # Only problems go to the console: the view itself is the output.
    setup_logging("tail", None, "warning")
    from services.monitor.tail import run_tail

    try:
        return run_tail(config)
    except KeyboardInterrupt:
        return EXIT_OK


def _alias(arg: str) -> str:
    name, sep, value = arg.partition("=")
    return TAIL_ALIASES.get(name, name) + sep + value


def load_tail_config(args: Sequence[str], environ: Mapping[str, str]) -> TailConfig:
    """Flags over files over environment; files are any rlbus config (only bus and the view key are read)."""
    from services.launcher.config import service_env

    files, cli = parse_argv(TailConfig, args)
    values = tail_values(service_env("monitor", environ))
    for path in files:
        values = deep_merge(values, tail_values(read_toml(path)))
    try:
        return TailConfig(**deep_merge(values, cli))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, TailConfig)) from None


def tail_values(source: Mapping[str, Any]) -> dict[str, Any]:
    """What tail takes from a monitor, rl or tail config: its own keys (``bus``, ...) and the view key."""
    values = {name: source[name] for name in TailConfig.model_fields if name in source}
    monitor = source.get("monitor", {})
    for key in (monitor.get("view_api_key"), source.get("view_api_key"), source.get("api_key")):
        if key is not None:
            values["api_key"] = key
    return values
