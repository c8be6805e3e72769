"""``rlbus monitor`` started alone (one service per host, compose) with ``[prime_platform]``: a real monitor
process on real sockets, streaming to a real local platform server. It registers the run once, also
across a restart, and marks the run's end itself; one handed a run id by ``rlbus rl`` only streams."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlbus.bus import Bus
from rlbus.config import BusConfig, BusEndpoints, write_toml
from rlbus.pubsub import TelemetryClient
from rlbus.services.monitor.config import MonitorConfig, PrimePlatformConfig
from rlbus.services.monitor.platform_run import RUN_FILE
from tests.integration.platform_server import PlatformServer

ROOT = Path(__file__).resolve().parents[3]
KEY = "sk-monitor-alone-key"
DEADLINE_S = 60.0


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rlbus-platform-", dir="/tmp"))  # ipc paths stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[PlatformServer]:
    with PlatformServer(api_key=KEY) as running:
        yield running


class Telemetry:
    """What the orchestrator and the trainer would send the monitor."""

    def __init__(self, bus_config: BusConfig) -> None:
        self.bus = Bus(bus_config)
        self.clients = {name: TelemetryClient(self.bus, name, f"{name}-0") for name in ("orchestrator", "trainer")}

    def step(self, step: int, finished: bool = False) -> None:
        """Both services' reports of ``step``; with ``finished``, each sends its ``finished`` event just
        before: each client's messages arrive in order, so once the step's row reaches the platform the
        monitor holds both events (no waiting on time)."""
        for name, client in self.clients.items():
            if finished:
                client.event("finished", f"{name} finished")
            client.metrics(step, {f"{name}/figure": float(step)})

    def close(self) -> None:
        self.bus.close()


def monitor_config(folder: Path, server: PlatformServer, **platform) -> tuple[Path, BusConfig]:
    endpoints = BusEndpoints(monitor_telemetry=f"ipc://{folder}/telemetry", monitor_view=f"ipc://{folder}/view")
    bus = BusConfig(endpoints=endpoints, linger_ms=1000)
    config = MonitorConfig(output_dir=folder / "run", bus=bus, max_steps=2, console=False,
                           prime_platform=PrimePlatformConfig(base_url=server.base_url, **platform))  # fmt: skip
    return write_toml(config, folder / "monitor.toml"), bus


def start_monitor(config_file: Path, home: Path, **env: str) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLBUS_", "WANDB_", "PRIME_"))}
    return subprocess.Popen([sys.executable, "-m", "rlbus", "monitor", "@", str(config_file)], cwd=ROOT,
                            env={**clean, "HOME": str(home), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def stop(proc: subprocess.Popen, signum: int = signal.SIGTERM) -> str:
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=DEADLINE_S)
    return output


def metrics_steps(server: PlatformServer) -> list[tuple[str, int]]:
    return [(r.body["run_id"], r.body["metrics"]["step"]) for r in server.of("metrics")]


def test_a_monitor_alone_registers_once_across_a_restart_and_marks_the_run_completed(folder, server):
    prime = folder / ".prime"
    prime.mkdir()
    (prime / "config.json").write_text(json.dumps({"api_key": KEY, "team_id": "file-team"}))
    config_file, bus = monitor_config(folder, server, run_name="alone")
    telemetry = Telemetry(bus)
    try:
        first = start_monitor(config_file, folder, PRIME_TEAM_ID="env-team")  # the key from the file
        server.wait_for(lambda s: s.of("register"), "the registration")
        telemetry.step(1)
        server.wait_for(lambda s: metrics_steps(s) == [("run-1", 1)], "step 1")
        stop(first, signal.SIGKILL)  # a crash: the run goes on, the restarted monitor must find it
        second = start_monitor(config_file, folder, PRIME_TEAM_ID="env-team")
        telemetry.step(2, finished=True)
        server.wait_for(lambda s: ("run-1", 2) in metrics_steps(s), "step 2 in the same run")
        output = stop(second)
    finally:
        telemetry.close()
    (registration,) = server.of("register")
    assert registration.body["team_id"] == "env-team"  # PRIME_TEAM_ID before the file's team
    assert registration.body["name"] == "alone" and registration.body["max_steps"] == 2
    assert [r.body for r in server.of("status")] == [{"status": "completed"}], output
    assert json.loads((folder / "run" / RUN_FILE).read_text())["status"] == "completed"
    assert KEY not in output and not any(KEY in p.read_text(errors="ignore") for p in folder.rglob("*")
                                         if p.is_file() and ".prime" not in p.parts)  # fmt: skip


def test_a_monitor_alone_stopped_before_the_run_finished_marks_it_failed(folder, server):
    config_file, bus = monitor_config(folder, server, team_id="config-team")
    telemetry = Telemetry(bus)
    try:
        proc = start_monitor(config_file, folder, PRIME_API_KEY=KEY, PRIME_TEAM_ID="env-team")
        telemetry.step(1)
        server.wait_for(lambda s: metrics_steps(s) == [("run-1", 1)], "step 1")
        output = stop(proc)
    finally:
        telemetry.close()
    assert server.of("register")[0].body["team_id"] == "config-team"
    (status,) = server.of("status")
    assert status.body["status"] == "failed", output
    assert (
        "was stopped (SIGTERM) before orchestrator, trainer finished; last step seen: 1" in status.body["error_message"]
    )


def test_a_monitor_handed_a_run_id_streams_and_leaves_the_end_to_its_launcher(folder, server):
    config_file, bus = monitor_config(folder, server, run_id="run-77")
    telemetry = Telemetry(bus)
    try:
        proc = start_monitor(config_file, folder, PRIME_API_KEY=KEY)
        telemetry.step(1, finished=True)
        server.wait_for(lambda s: metrics_steps(s) == [("run-77", 1)], "step 1 of the given run")
        output = stop(proc)
    finally:
        telemetry.close()
    assert proc.returncode == 0, output
    assert server.of("register") == [] and server.of("status") == []


def test_a_monitor_without_a_key_stops_before_it_starts_naming_both_places(folder, server):
    config_file, _ = monitor_config(folder, server)
    proc = start_monitor(config_file, folder)
    output, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 1, output
    assert "PRIME_API_KEY is not set" in output and f"{folder}/.prime/config.json has no api_key" in output
    assert server.requests == [] and not (folder / "run" / "metrics.jsonl").exists()
