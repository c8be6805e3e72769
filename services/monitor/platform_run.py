"""The monitor's Prime platform run: stream into the run ``rlbus rl`` registered, or register it itself.

Under ``rlbus rl`` (locally, under ``rlbus run`` and with ``--slurm``) the launcher registered the run
before any service started and wrote its id into the monitor's resolved config
(``prime_platform.run_id``): the monitor only streams, and the launcher, which knows why the run
ended, marks it; only when the launcher died first (kill -9: its parent-death signal stopped the
monitor, which finds itself reparented) does the monitor mark it. A monitor started alone (one
service per host, compose) gets no id: at its first start it registers the run and keeps the id in
``<output_dir>/prime-platform-run.json``, so a restarted monitor streams into the same run instead
of registering a second one; when it stops it marks the run completed if the orchestrator and the
trainer reported ``finished``, failed otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from rlbus.config import read_toml
from rlbus.config.base import write_private
from rlbus.platform_client import PlatformClient, mark_end, register_run
from rlbus.prime_platform import LAUNCHER_PID_VARIABLE, PlatformError, dashboard_url, resolve_api_key
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.monitor.platform_stream import PlatformStream

RUN_FILE = "prime-platform-run.json"
STREAM_TIMEOUT_S = 10.0
"""Longest wait for one answer: a platform that hangs must not hold the monitor's stop (``stop_timeout_s``)."""
FINISHERS = frozenset({"orchestrator", "trainer"})
"""Services whose ``finished`` events mean the run trained every step."""


@dataclass
class MonitorPlatformRun:
    """The run the monitor streams into, and whether marking its end is the monitor's job."""

    client: PlatformClient
    run_id: str
    stream: PlatformStream
    owned: bool
    """Registered by this monitor (alone), not handed over by ``rlbus rl``."""
    run_file: Path
    launcher_pid: int | None = None
    """The ``rlbus rl`` that started this monitor (``RLBUS_LAUNCHER_PID``); None when started alone."""

    def finish(self, exit_code: int, finished: set[str], last_step: int | None, parent_pid: int | None = None) -> None:
        """After the stream closed: mark the run's end when that is the monitor's job (:func:`end_to_mark`;
        ``parent_pid`` is ``os.getppid()`` unless given); close the client either way."""
        try:
            parent_pid = os.getppid() if parent_pid is None else parent_pid
            end = end_to_mark(self.owned, self.launcher_pid, parent_pid, exit_code, finished, last_step)
            if end is None:
                return
            if not self.owned:
                logger.warning("prime platform: the launcher (pid {}) is gone (this monitor's parent is now pid {}): "
                               "marking run {} here", self.launcher_pid, parent_pid, self.run_id)  # fmt: skip
            if mark_end(self.client, self.run_id, *end) and self.owned:
                _write_run_file(self.run_file, self.run_id, _known(self.run_file).get("base_url"), end[0])
        finally:
            self.client.close()


def open_platform_run(config: MonitorConfig, environ: Mapping[str, str]) -> MonitorPlatformRun:
    """The run to stream into: handed over, resumed from the run file, or registered now."""
    settings = config.prime_platform
    assert settings is not None
    launcher = launcher_pid(environ)
    client = PlatformClient(settings.base_url, resolve_api_key(environ), timeout_s=STREAM_TIMEOUT_S)
    run_file = config.output_dir / RUN_FILE
    try:
        run_id, owned = _run_id(config, client, run_file, environ)
    except BaseException:
        client.close()
        raise
    return MonitorPlatformRun(client, run_id, PlatformStream(client, run_id), owned, run_file, launcher)


def launcher_pid(environ: Mapping[str, str]) -> int | None:
    """The pid ``rlbus rl`` gave its services in ``RLBUS_LAUNCHER_PID``; None when not started by it."""
    value = environ.get(LAUNCHER_PID_VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) == 0:
        raise PlatformError(f"{LAUNCHER_PID_VARIABLE}={value!r} is not a process id: it is set by `rlbus rl` for the "
                            "services it starts; unset it to run a monitor alone")  # fmt: skip
    return int(value)


def end_to_mark(owned: bool, launcher: int | None, parent_pid: int, exit_code: int, finished: set[str],
                last_step: int | None) -> tuple[str, str | None] | None:  # fmt: skip
    """What the monitor marks as it stops, or None. A run it registered: by what it saw (:func:`outcome`).
    A run handed over by ``rlbus rl``: nothing while the launcher is its parent (it marks the run once the
    monitor stopped); when the parent changed, the launcher died (kill -9) and nobody else will mark it:
    completed if every finisher reported ``finished``, else failed naming the launcher."""
    if owned:
        return outcome(exit_code, finished, last_step)
    if launcher is None or parent_pid == launcher:
        return None
    if FINISHERS <= finished:
        return "completed", None
    return "failed", f"the launcher (pid {launcher}) died before the run ended; last step seen: {last_step}"


def outcome(exit_code: int, finished: set[str], last_step: int | None) -> tuple[str, str | None]:
    """``completed`` when every finisher reported ``finished``; else ``failed`` with what the monitor saw."""
    if FINISHERS <= finished:
        return "completed", None
    how = {0: "was stopped (SIGTERM)", 130: "was interrupted (Ctrl-C)"}.get(exit_code, f"failed (exit {exit_code})")
    missing = ", ".join(sorted(FINISHERS - finished))
    return "failed", f"the monitor {how} before {missing} finished; last step seen: {last_step}"


def _run_id(config: MonitorConfig, client: PlatformClient, run_file: Path,
            environ: Mapping[str, str]) -> tuple[str, bool]:  # fmt: skip
    settings = config.prime_platform
    assert settings is not None
    if settings.run_id is not None:
        logger.info("prime platform: streaming into run {} ({}); its launcher marks its end", settings.run_id,
                    dashboard_url(settings.run_id, environ))  # fmt: skip
        return settings.run_id, False
    known = _known(run_file)
    if known.get("run_id") and known.get("status") is None and known.get("base_url") == settings.base_url:
        logger.info("prime platform: streaming into run {} again ({}, from {})", known["run_id"],
                    dashboard_url(known["run_id"], environ), run_file)  # fmt: skip
        return str(known["run_id"]), True
    run_id = register_run(client, _run_values(config), settings.run_name, settings.team_id, environ)
    _write_run_file(run_file, run_id, settings.base_url, None)
    return run_id, True


def _run_values(config: MonitorConfig) -> dict[str, Any]:
    """What the run registers with: the merged config next to the monitor's (``rlbus rl --dry-run`` wrote
    it, as compose does), else the monitor's own."""
    merged = config.output_dir / "configs" / "rl.toml"
    if merged.is_file():
        return read_toml(merged)
    return {"model": config.model, "max_steps": config.max_steps, "monitor": config.model_dump(mode="json")}


def _known(run_file: Path) -> dict[str, Any]:
    try:
        values = json.loads(run_file.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def _write_run_file(run_file: Path, run_id: str, base_url: str | None, status: str | None) -> None:
    write_private(run_file, json.dumps({"run_id": run_id, "base_url": base_url, "status": status}) + "\n")
