"""A health probe that asks the monitor, for container healthchecks (``docker compose``).

Usage::

    python -m services.monitor.probe @ rl.toml                      # the monitor answers its live view
    python -m services.monitor.probe @ rl.toml --service trainer    # ... and hears this host's trainer

Services other than inference (which has ``GET /health``) serve nothing a probe
could call, but every one of them sends heartbeats to the monitor. So the honest
question is the monitor's: is a live replica of ``--service`` on this host
(``--host``, default this machine's hostname, which is what heartbeats carry)?
Exit 0 when yes, 1 with the reason on stderr otherwise, 2 for a bad config.
Config files and flags are those of ``rlbus tail`` (``bus``, the view key, ``--timeout-s``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from common.bus import Bus
from common.config import ConfigError
from common.logging import setup_logging
from common.messages import ServiceHealth
from services.monitor.main import load_tail_config
from services.monitor.tail import MonitorUnreachable, ViewClient, ViewRefused

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_CONFIG = 0, 1, 2


def find_live_replica(rows: Sequence[ServiceHealth], service: str, host: str) -> ServiceHealth | None:
    """The first row of ``service`` on ``host`` that the monitor still hears, if any."""
    return next((row for row in rows if row.service == service and row.host == host and row.alive), None)


def probe(argv: Sequence[str], environ: dict[str, str] | None = None) -> tuple[int, str]:
    """(exit code, one-line reason) of one probe."""
    parser = argparse.ArgumentParser(prog="python -m services.monitor.probe", add_help=True)
    parser.add_argument("--service", help="service that must be alive on --host (none: only ask the monitor)")
    parser.add_argument("--host", default=socket.gethostname(), help="host of that service (default: this one)")
    ours, rest = parser.parse_known_args(list(argv))
    try:
        config = load_tail_config(rest, os.environ if environ is None else environ)
    except ConfigError as exc:
        return EXIT_CONFIG, str(exc)
    with Bus(config.bus) as bus:
        try:
            snapshot = ViewClient(bus, config).snapshot()
        except (MonitorUnreachable, ViewRefused) as exc:
            return EXIT_UNHEALTHY, str(exc)
    if ours.service is None:
        return EXIT_HEALTHY, f"the monitor answered (step {snapshot.step})"
    row = find_live_replica(snapshot.health, ours.service, ours.host)
    if row is None:
        seen = sorted({f"{r.service}@{r.host}{'' if r.alive else ' (dead)'}" for r in snapshot.health})
        return EXIT_UNHEALTHY, f"the monitor hears no live {ours.service} on {ours.host}; it knows {seen}"
    return EXIT_HEALTHY, f"{row.replica_id} is {row.status} at step {row.step}"


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging("probe", None, "warning")
    code, reason = probe(sys.argv[1:] if argv is None else argv)
    # Docker keeps a healthcheck's output for `docker inspect`: one line saying why.
    (sys.stdout if code == EXIT_HEALTHY else sys.stderr).write(f"{reason}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
