"""The healthcheck probe (``rlbus probe``: services/entry.py, services/monitor/probe.py) against a real monitor process."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlbus.messages import ServiceHealth
from rlbus.services.entry import PROBE_EXIT_CONFIG as EXIT_CONFIG
from rlbus.services.entry import probe
from rlbus.services.monitor.probe import EXIT_HEALTHY, EXIT_UNHEALTHY, find_live_replica
from tests.unit.monitor.test_service import DEADLINE_S, MonitorProcess

HOST = socket.gethostname()


def row(service: str, host: str, alive: bool) -> ServiceHealth:
    return ServiceHealth(service=service, replica_id=f"{service}-1", status="ready", alive=alive, last_seen=1.0,
                         host=host)  # fmt: skip


def test_a_live_row_of_the_service_on_the_host_is_required():
    rows = [row("trainer", "a", alive=False), row("trainer", "b", alive=True), row("monitor", "a", alive=True)]
    assert find_live_replica(rows, "trainer", "b") is rows[1]
    assert find_live_replica(rows, "trainer", "a") is None  # dead
    assert find_live_replica(rows, "orchestrator", "a") is None


@pytest.fixture
def monitor() -> Iterator[MonitorProcess]:
    # ipc paths must stay under ~100 bytes, so not under pytest's long tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="rlbus-probe-", dir="/tmp"))
    process = MonitorProcess(folder, view_api_key="probe-key")
    yield process
    process.stop()
    shutil.rmtree(folder, ignore_errors=True)


def probe_until_healthy(argv: list[str]) -> tuple[int, str]:
    """Heartbeats travel asynchronously: ask again until healthy or the deadline (a condition polled)."""
    deadline = time.monotonic() + DEADLINE_S
    code, reason = probe(argv, {})
    while code != EXIT_HEALTHY and time.monotonic() < deadline:
        code, reason = probe(argv, {})
    return code, reason


def test_probe_asks_the_monitor_which_services_it_hears(monitor: MonitorProcess):
    config = ["@", str(monitor.config_file)]  # the monitor's own file: bus and view key
    assert probe_until_healthy(config)[0] == EXIT_HEALTHY
    telemetry = monitor.telemetry("trainer", "trainer-rank0")
    telemetry.heartbeat()
    code, reason = probe_until_healthy([*config, "--service", "trainer"])
    assert code == EXIT_HEALTHY and "trainer-rank0" in reason, reason
    code, reason = probe([*config, "--service", "orchestrator"], {})
    assert code == EXIT_UNHEALTHY and f"no live orchestrator on {HOST}" in reason and "trainer@" in reason, reason
    code, reason = probe([*config, "--service", "trainer", "--host", "elsewhere"], {})
    assert code == EXIT_UNHEALTHY and "elsewhere" in reason, reason


def test_probe_fails_when_the_key_is_wrong_or_nobody_answers(monitor: MonitorProcess):
    code, reason = probe(["@", str(monitor.config_file), "--api-key", "wrong"], {})
    assert code == EXIT_UNHEALTHY and "refused" in reason, reason
    nobody = f"ipc://{monitor.config_file.parent}/nobody"
    code, reason = probe(["--bus.endpoints.monitor-view", nobody, "--timeout-s", "0.5"], {})
    assert code == EXIT_UNHEALTHY and "no answer" in reason, reason


def test_probe_reports_a_bad_config_as_such():
    assert probe(["--no-such-key", "1"], {})[0] == EXIT_CONFIG
