"""``rlbus monitor`` started alone (one service per host, compose) with ``[prime_platform]``: a real monitor
process on real sockets, streaming to a real local platform server. It registers the run once, also
across a restart, and marks the run's end itself; one handed a run id by ``rlbus rl`` only streams,
unless its launcher died first (kill -9): then it marks the run failed, naming the launcher."""

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
from rlbus.prime_platform import LAUNCHER_PID_VARIABLE, PlatformError
from rlbus.pubsub import TelemetryClient
from rlbus.services.monitor.config import MonitorConfig, PrimePlatformConfig
from rlbus.services.monitor.platform_run import RUN_FILE, end_to_mark, launcher_pid
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


def start_monitor(
    config_file: Path, home: Path, argv: tuple[str, ...] | list[str] = (), **env: str
) -> subprocess.Popen:
    """``rlbus monitor @ config_file`` (after ``argv``: a command that starts it) with ``HOME=home``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLBUS_", "WANDB_", "PRIME_"))}
    return subprocess.Popen([*argv, sys.executable, "-m", "rlbus", "monitor", "@", str(config_file)], cwd=ROOT,
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


@pytest.mark.parametrize("under_launcher", [False, True])
def test_a_monitor_handed_a_run_id_streams_and_leaves_the_end_to_its_launcher(folder, server, under_launcher):
    config_file, bus = monitor_config(folder, server, run_id="run-77")
    telemetry = Telemetry(bus)
    # Under rlbus rl: the launcher's pid is its parent's (this test's), and it stays alive.
    launcher = {LAUNCHER_PID_VARIABLE: str(os.getpid())} if under_launcher else {}
    try:
        proc = start_monitor(config_file, folder, PRIME_API_KEY=KEY, **launcher)
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


LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], env={**os.environ, "RLBUS_LAUNCHER_PID": str(os.getpid())})
print(child.pid, flush=True)
child.wait()
"""
"""A stand-in ``rlbus rl``: starts the monitor as its child with its own pid in ``RLBUS_LAUNCHER_PID``."""


def test_a_monitor_whose_launcher_was_killed_marks_the_run_failed_naming_it(folder, server):
    config_file, bus = monitor_config(folder, server, run_id="run-77")
    telemetry = Telemetry(bus)
    launcher = start_monitor(config_file, folder, PRIME_API_KEY=KEY, argv=[sys.executable, "-c", LAUNCHER])
    monitor_pid = int(launcher.stdout.readline())
    try:
        telemetry.step(1)
        server.wait_for(lambda s: metrics_steps(s) == [("run-77", 1)], "step 1 of the given run")
        launcher.kill()
        launcher.wait()
        os.kill(monitor_pid, signal.SIGTERM)  # what the parent-death signal sends under rlbus rl
        output, _ = launcher.communicate(timeout=DEADLINE_S)  # the monitor's output, to its end
    finally:
        telemetry.close()
        if Path(f"/proc/{monitor_pid}").exists():
            os.kill(monitor_pid, signal.SIGKILL)
    reason = f"the launcher (pid {launcher.pid}) died before the run ended; last step seen: 1"
    assert [r.body for r in server.of("status")] == [{"status": "failed", "error_message": reason}], output
    assert f"the launcher (pid {launcher.pid}) is gone" in output and server.of("register") == []


@pytest.mark.parametrize(
    ("owned", "parent", "finished", "expected"),
    [
        (False, 40, set(), None),  # the launcher is still the parent: it marks
        (False, 1, set(), ("failed", "the launcher (pid 40) died before the run ended; last step seen: 3")),
        (False, 1, {"orchestrator", "trainer"}, ("completed", None)),  # it died after the run ended
        (True, 1, {"orchestrator"}, ("failed", ("the monitor was stopped (SIGTERM) before trainer finished; "
                                               "last step seen: 3"))),  # registered alone: by what it saw
    ],
)  # fmt: skip
def test_what_a_stopping_monitor_marks(owned, parent, finished, expected):
    assert end_to_mark(owned, 40, parent, 0, finished, 3) == expected
    assert end_to_mark(False, None, parent, 0, finished, 3) is None  # not started by rlbus rl: never


def test_the_launcher_pid_variable_is_a_pid_or_a_clear_error():
    assert launcher_pid({}) is None and launcher_pid({LAUNCHER_PID_VARIABLE: " "}) is None
    assert launcher_pid({LAUNCHER_PID_VARIABLE: "4242"}) == 4242
    assert launcher_pid({LAUNCHER_PID_VARIABLE: "1"}) == 1  # rlbus rl as a container's init
    for bad in ("abc", "-5", "0"):
        with pytest.raises(PlatformError, match=f"RLBUS_LAUNCHER_PID='{bad}' is not a process id"):
            launcher_pid({LAUNCHER_PID_VARIABLE: bad})
