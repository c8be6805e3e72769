"""The dashboard: a web page of a run, live from the monitor or from finished runs' folders.

- Live: the monitor serves its own run on ``monitor.dashboard`` (:func:`start_live_dashboard`),
  with the service health table it keeps; charts follow the files it writes.
- ``rlbus dashboard <output_dir> [<output_dir> ...]``: the same page from run folders (:func:`main`),
  several runs overlaid, each named by its folder; a run still writing its folder keeps updating.

On a non-loopback host the monitor's key (``view_api_key``) is required on every request
(:mod:`rlbus.services.monitor.dashboard_server`); without one such a host is refused.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import msgspec
from loguru import logger

from rlbus.curve import is_loopback_host
from rlbus.logging import setup_logging
from rlbus.messages import ServiceHealth
from rlbus.run_files import run_folder_problem
from rlbus.services.monitor.config import DEFAULT_DASHBOARD, MonitorConfig, dashboard_address
from rlbus.services.monitor.dashboard_server import DashboardServer, missing_static_files
from rlbus.services.monitor.dashboard_state import Dashboard

KEY_VARIABLE = "RLBUS_MONITOR__VIEW_API_KEY"


def start_live_dashboard(config: MonitorConfig) -> DashboardServer | None:
    """The monitor's dashboard, serving; None when ``monitor.dashboard`` is off or its port is taken
    (a warning: the run goes on without its page)."""
    address = dashboard_address(config.dashboard)
    if address is None:
        return None
    host, port = address
    _warn_if_unbuilt()
    dashboard = Dashboard.of_folders([(config.output_dir, config.output_dir.resolve().name)], live=True,
                                     model=config.model, max_steps=config.max_steps)  # fmt: skip
    key = None if is_loopback_host(host) else config.view_api_key
    try:
        server = DashboardServer(dashboard, host, port, key).start()
    except OSError as exc:
        logger.warning("dashboard not served at {}: {}; set monitor.dashboard to a free host:port ('' for none)",
                       config.dashboard, exc)  # fmt: skip
        return None
    logger.info("dashboard: {}{}", server.url, "?key=<monitor.view_api_key>" if key else "")
    return server


def publish_health(server: DashboardServer, rows: list[ServiceHealth]) -> None:
    """The monitor's health table, for the page's service table."""
    server.dashboard.set_health([msgspec.to_builtins(row) for row in rows])


def _warn_if_unbuilt() -> None:
    missing = missing_static_files()
    if missing:
        logger.warning("dashboard page incomplete: {} missing; run scripts/build_dashboard.sh (npm ci)",
                       ", ".join(str(path) for path in missing))  # fmt: skip


def run_names(output_dirs: Sequence[Path]) -> list[tuple[Path, str]]:
    """Each folder with the name the page shows: its own, or the path given where two share one."""
    names = [output_dir.resolve().name for output_dir in output_dirs]
    return [(output_dir, name if names.count(name) == 1 else str(output_dir))
            for output_dir, name in zip(output_dirs, names, strict=True)]  # fmt: skip


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    default_host, default_port = dashboard_address(DEFAULT_DASHBOARD) or ("127.0.0.1", 0)
    parser = argparse.ArgumentParser(
        prog="rlbus dashboard",
        description="Serve the dashboard page (charts, events, sample rollouts) of run folders, finished or "
        "still running; several runs are overlaid in each chart. Stops on Ctrl-C.",
    )  # fmt: skip
    parser.add_argument("output_dirs", nargs="+", type=Path, metavar="output_dir", help="run folder(s)")
    parser.add_argument(
        "--host", default=default_host, help=f"interface to listen on (default {default_host}); another needs --api-key"
    )
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port}; 0: any free)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(KEY_VARIABLE),
        help=f"key every request must carry (default: ${KEY_VARIABLE}); pages open with /?key=KEY",
    )
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    """``rlbus dashboard``: serve until Ctrl-C or SIGTERM."""
    args = parse_args(argv)
    problem = run_folder_problem(args.output_dirs)
    if problem is None and not 0 <= args.port <= 65535:
        problem = f"--port {args.port} is not a port (0 to 65535)"
    if problem is None and args.api_key is None and not is_loopback_host(args.host):
        problem = (
            f"refusing to serve on --host {args.host} without --api-key (or ${KEY_VARIABLE}): "
            "anyone who reaches it could read the runs"
        )
    if problem:
        sys.stderr.write(f"rlbus dashboard: {problem}\n")
        return 2
    setup_logging("dashboard", None, "warning")  # the URL is the output; only problems go to the console
    _warn_if_unbuilt()
    try:
        server = DashboardServer(Dashboard.of_folders(run_names(args.output_dirs)), args.host, args.port,
                                 args.api_key if not is_loopback_host(args.host) else None).start()  # fmt: skip
    except OSError as exc:
        sys.stderr.write(
            f"rlbus dashboard: cannot listen on {args.host}:{args.port}: {exc} (a running monitor's "
            "dashboard may hold the port: --port 0 picks a free one)\n"
        )
        return 1
    sys.stdout.write(f"dashboard of {len(args.output_dirs)} run(s): {server.url}\n")
    sys.stdout.flush()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
