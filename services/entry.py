"""The shared entry of every config-driven command: the one place configs are resolved.

Parse and validate the config (exit 2 on any mistake, before anything
starts), honour ``--help`` and ``--dry-run``, set up logging, write the
resolved config next to the logs, then run the service. ``RLBUS_*``
environment variables are read with the merged ``rl`` schema
(:mod:`rlbus.services.run_config`), so one environment serves every service.
``rlbus tail`` resolves its own small config here too.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loguru import logger
from pydantic import ValidationError

from rlbus.config import ConfigError, ServiceConfig, deep_merge, load_config, parse_argv, read_toml, write_toml
from rlbus.config.base import REDACTED
from rlbus.config.errors import format_validation_error
from rlbus.config.help import usage_text
from rlbus.errors import UserError
from rlbus.logging import FILE_ONLY, setup_logging
from rlbus.services.monitor.config import TailConfig
from rlbus.services.run_config import SECTIONS, mark_run_folder, service_env
from rlbus.services.run_config.checks import check_config

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
            env = service_env(_section_of(cls), os.environ)
        config = load_config(cls, args, env=env)
        check_config(config)  # what only fails after start: before --dry-run writes anything
    except ConfigError as exc:
        sys.stderr.write(f"rlbus {command}: {exc}\n")
        return EXIT_CONFIG
    if dry_run:
        try:
            written = write_resolved(config)
            mark_run_folder(config.output_dir)
        except OSError as exc:
            sys.stderr.write(f"rlbus {command}: {unwritable_output_dir(config.output_dir, exc)}\n")
            return EXIT_FAILED
        for path in written:
            sys.stdout.write(f"{path}\n")
        return EXIT_OK
    if run is None:
        sys.stderr.write(f"rlbus {command}: the config is valid, but this command is not built yet\n")
        return EXIT_NOT_BUILT
    try:
        open_run_folder(config)
        return run(config)
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130
    except UserError as exc:
        # One line for the user; the traceback is for the log file (when logging is set up).
        logger.bind(**{FILE_ONLY: True}).exception(f"{command} failed")
        sys.stderr.write(f"rlbus {command}: {exc}\n")
        return EXIT_FAILED
    except Exception:
        logger.exception(f"{command} failed")
        return EXIT_FAILED


def open_run_folder(config: ServiceConfig) -> None:
    """Log to ``<output_dir>/logs/``, write the resolved configs and the run marker; a
    :class:`UserError` naming the folder when it cannot be written."""
    try:
        setup_logging(config.SERVICE, config.output_dir, config.log.level, config.log.json_lines)
        write_resolved(config)
        mark_run_folder(config.output_dir)
    except OSError as exc:
        raise UserError(unwritable_output_dir(config.output_dir, exc)) from exc


def unwritable_output_dir(output_dir: Path, exc: OSError) -> str:
    """Why ``output_dir`` cannot hold a run, and what to do, in one line."""
    if output_dir.exists() and not output_dir.is_dir():
        return f"output_dir {str(output_dir)!r} is a file, not a folder: pick another --output-dir"
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(output_dir) else ""
    return (f"cannot write to output_dir {str(output_dir)!r}{where}: {exc.strerror or exc}; "
            "pick a folder you can write to with --output-dir")


def write_resolved(config: ServiceConfig) -> list:
    """Write ``<output_dir>/configs/<service>.toml`` for every resolved config: secrets redacted,
    files 0600 in a 0700 folder (they still show a run's whole setup)."""
    folder = config.output_dir / "configs"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # also a folder made by an older version, or with another umask
    return [write_toml(cfg, folder / f"{stem}.toml") for stem, cfg in config.resolved_configs().items()]


def _section_of(cls: type[ServiceConfig]) -> str | None:
    # A subclass (``rlbus eval`` takes the orchestrator's config plus a client) reads its parent's section.
    return next((name for name, section in SECTIONS.items() if issubclass(cls, section)), None)


# ------------------------------------------------------------------ rlbus tail

TAIL_SUMMARY = "Live view of a running job: latest step's metrics, service health, new log lines."
# --json is what users type; the field is json_lines because pydantic models already have .json().
TAIL_ALIASES = {"--json": "--json-lines", "--no-json": "--no-json-lines", "--monitor": "--monitor-address"}
# What zmq's connect takes; anything else fails deep inside it with a traceback.
ZMQ_ADDRESS = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):\d+|ipc://\S+|inproc://\S+")


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
    address = config.monitor_address or config.bus.endpoints.monitor_view
    if not ZMQ_ADDRESS.fullmatch(address):
        sys.stderr.write(f"rlbus tail: monitor address {address!r} is not a ZeroMQ address: give --monitor "
                         "tcp://HOST:PORT (the monitor's bus.endpoints.monitor_view, e.g. tcp://127.0.0.1:5556)\n")
        return EXIT_FAILED
    # Only problems go to the console: the view itself is the output.
    setup_logging("tail", None, "warning")
    from rlbus.services.monitor.tail import run_tail

    try:
        return run_tail(config)
    except KeyboardInterrupt:
        return EXIT_OK


def _alias(arg: str) -> str:
    name, sep, value = arg.partition("=")
    return TAIL_ALIASES.get(name, name) + sep + value


def load_tail_config(args: Sequence[str], environ: Mapping[str, str]) -> TailConfig:
    """Flags over files over environment; files are any rlbus config (only bus and the view key are read)."""
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
        if key is not None and key != REDACTED:  # a resolved config's placeholder: the key comes from elsewhere
            values["api_key"] = key
    return values


# ----------------------------------------------------------------- rlbus probe

PROBE_EXIT_CONFIG = 2


def probe(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """(exit code, one-line reason) of one container healthcheck (:mod:`rlbus.services.monitor.probe`);
    config files and flags are those of ``rlbus tail``."""
    parser = argparse.ArgumentParser(prog="rlbus probe", add_help=True)
    parser.add_argument("--service", help="service that must be alive on --host (none: only ask the monitor)")
    parser.add_argument("--host", default=socket.gethostname(), help="host of that service (default: this one)")
    ours, rest = parser.parse_known_args(list(argv))
    try:
        config = load_tail_config(rest, os.environ if environ is None else environ)
    except ConfigError as exc:
        return PROBE_EXIT_CONFIG, str(exc)
    from rlbus.services.monitor.probe import check_health

    return check_health(config, ours.service, ours.host)


def probe_main(argv: Sequence[str]) -> int:
    setup_logging("probe", None, "warning")
    code, reason = probe(argv)
    # Docker keeps a healthcheck's output for `docker inspect`: one line saying why.
    (sys.stdout if code == 0 else sys.stderr).write(f"{reason}\n")
    return code
