"""A health probe that asks the monitor, for container healthchecks (``docker compose``).

Usage (``rlbus probe``; the CLI entry resolves the config and calls :func:`check_health`)::

    rlbus probe @ rl.toml                      # the monitor answers its live view
    rlbus probe @ rl.toml --service trainer    # ... and hears this host's trainer

Services other than inference (which has ``GET /health``) serve nothing a probe
could call, but every one of them sends heartbeats to the monitor. So the honest
question is the monitor's: is a live replica of ``--service`` on this host
(``--host``, default this machine's hostname, which is what heartbeats carry)?
Exit 0 when yes, 1 with the reason on stderr otherwise, 2 for a bad config.
Config files and flags are those of ``rlbus tail`` (``bus``, the view key, ``--timeout-s``).
"""

from __future__ import annotations

from collections.abc import Sequence

from rlbus.bus import Bus
from rlbus.messages import ServiceHealth
from rlbus.services.monitor.config import TailConfig
from rlbus.services.monitor.tail import MonitorUnreachable, ViewClient, ViewRefused

EXIT_HEALTHY, EXIT_UNHEALTHY = 0, 1  # a bad config is the entry's exit 2


def find_live_replica(rows: Sequence[ServiceHealth], service: str, host: str) -> ServiceHealth | None:
    """The first row of ``service`` on ``host`` that the monitor still hears, if any."""
    return next((row for row in rows if row.service == service and row.host == host and row.alive), None)


def check_health(config: TailConfig, service: str | None, host: str) -> tuple[int, str]:
    """(exit code, one-line reason): does the monitor answer, and does it hear a live ``service`` on ``host``?"""
    with Bus(config.bus) as bus:
        try:
            snapshot = ViewClient(bus, config).snapshot()
        except (MonitorUnreachable, ViewRefused) as exc:
            return EXIT_UNHEALTHY, str(exc)
    if service is None:
        return EXIT_HEALTHY, f"the monitor answered (step {snapshot.step})"
    row = find_live_replica(snapshot.health, service, host)
    if row is None:
        seen = sorted({f"{r.service}@{r.host}{'' if r.alive else ' (dead)'}" for r in snapshot.health})
        return EXIT_UNHEALTHY, f"the monitor hears no live {service} on {host}; it knows {seen}"
    return EXIT_HEALTHY, f"{row.replica_id} is {row.status} at step {row.step}"
