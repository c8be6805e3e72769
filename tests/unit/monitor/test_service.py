"""``rlbus monitor`` as a real process over real sockets, read back by ``rlbus tail``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from rlbus.bus import Bus
from rlbus.config import BusConfig, BusEndpoints, write_toml
from rlbus.messages import Refused, ViewRequest, ViewSnapshot
from rlbus.pubsub import TelemetryClient
from rlbus.services.monitor.config import MonitorConfig

ROOT = Path(__file__).resolve().parents[3]
API_KEY = "view-key"
DEADLINE_S = 60.0


def rlbus(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlbus", *args]


class MonitorProcess:
    def __init__(self, folder: Path, **overrides) -> None:
        # ipc endpoints: no tcp port can clash with another test run on this machine.
        endpoints = BusEndpoints(monitor_telemetry=f"ipc://{folder}/telemetry", monitor_view=f"ipc://{folder}/view")
        self.bus_config = BusConfig(endpoints=endpoints, linger_ms=1000, request_timeout_s=10)
        self.config = MonitorConfig(output_dir=folder / "run", bus=self.bus_config, **overrides)
        self.config_file = write_toml(self.config, folder / "monitor.toml", reveal_secrets=True)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLBUS_", "WANDB_"))}
        self.proc = subprocess.Popen(rlbus("monitor", "@", str(self.config_file)), cwd=ROOT, env=clean,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.bus = Bus(self.bus_config)
        self.view = self.bus.connect(zmq.DEALER, endpoints.monitor_view, "test-view")

    @property
    def output_dir(self) -> Path:
        return self.config.output_dir

    def snapshot(self) -> ViewSnapshot:
        reply = self.bus.request(self.view, ViewRequest(api_key=self.config.view_api_key), (ViewSnapshot, Refused),
                                 timeout_s=DEADLINE_S)  # fmt: skip
        assert isinstance(reply, ViewSnapshot), reply
        return reply

    def wait_view(self, condition: Callable[[ViewSnapshot], bool], what: str) -> ViewSnapshot:
        """Ask again until ``condition`` holds: a condition polled with a deadline, not a timed assertion."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            snapshot = self.snapshot()
            if condition(snapshot):
                return snapshot
            self.view.poll(50)  # pace the requests; nothing else arrives on this socket
        raise AssertionError(f"monitor never showed {what}; last snapshot {snapshot}")

    def telemetry(self, service: str, replica_id: str) -> TelemetryClient:
        return TelemetryClient(self.bus, service, replica_id)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            output, _ = self.proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
        self.bus.close()
        return output


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    # ipc paths must stay under ~100 bytes, so not under pytest's long tmp_path.
    path = Path(tempfile.mkdtemp(prefix="rlbus-mon-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def monitor(folder: Path) -> Iterator[MonitorProcess]:
    process = MonitorProcess(folder / "shared", dead_after_s=1.0, view_api_key=API_KEY)
    yield process
    output = process.stop()
    assert process.proc.returncode == 0, output


def metrics_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_pushed_metrics_become_lines_and_a_step_in_the_live_view(monitor: MonitorProcess):
    orchestrator = monitor.telemetry("orchestrator", "orchestrator-0")
    trainer = monitor.telemetry("trainer", "trainer-0")
    orchestrator.metrics(0, {"reward/all/mean": 0.25})
    trainer.metrics(0, {"loss/mean": 1.5})
    snapshot = monitor.wait_view(lambda s: s.step == 0, "step 0")
    assert snapshot.metrics == {"reward/all/mean": 0.25, "loss/mean": 1.5}
    rows = {(r["service"], r["step"]): r for r in metrics_lines(monitor.output_dir)}
    assert rows[("orchestrator", 0)]["reward/all/mean"] == 0.25 and rows[("trainer", 0)]["loss/mean"] == 1.5
    assert rows[("trainer", 0)]["replica_id"] == "trainer-0"
    assert any("step 0 | reward/all/mean 0.25 | loss/mean 1.5" in line for line in snapshot.log_lines)


def test_a_service_that_stops_beating_is_reported_dead(monitor: MonitorProcess):
    worker = monitor.telemetry("env-worker", "env-worker-7")
    worker.heartbeat(status="waiting", step=3, waiting_for="tasks")
    monitor.wait_view(lambda s: any(h.replica_id == "env-worker-7" for h in s.health), "env-worker-7's heartbeat")
    snapshot = monitor.wait_view(
        lambda s: any(h.replica_id == "env-worker-7" and h.status == "dead" for h in s.health), "env-worker-7 dead"
    )
    assert any("env-worker/env-worker-7 is DEAD" in line for line in snapshot.log_lines)
    events = [json.loads(line) for line in (monitor.output_dir / "events.jsonl").read_text().splitlines()]
    dead = [e for e in events if e["kind"] == "service_dead" and e["replica_id"] == "env-worker-7"]
    assert len(dead) == 1 and dead[0]["level"] == "warning" and "waiting for tasks" in dead[0]["message"]


def test_tail_json_once_prints_one_snapshot(monitor: MonitorProcess):
    monitor.telemetry("inference", "inference-0").heartbeat(status="ready", step=2)
    monitor.wait_view(lambda s: any(h.service == "inference" for h in s.health), "inference's heartbeat")
    result = subprocess.run(
        rlbus("tail", "@", str(monitor.config_file), "--json", "--once", "--api-key", API_KEY),
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    snapshot = json.loads(line)
    assert {"step", "metrics", "health", "log_lines", "log_offset", "sent_at"} <= set(snapshot)
    inference = [h for h in snapshot["health"] if h["service"] == "inference"]
    assert (inference[0]["step"], inference[0]["replica_id"]) == (2, "inference-0")
    assert snapshot["log_offset"] == len(snapshot["log_lines"]) > 0


def test_tail_with_a_wrong_key_is_refused_and_says_why(monitor: MonitorProcess):
    bus = monitor.config.bus.endpoints.monitor_view
    result = subprocess.run(
        rlbus("tail", "--json", "--once", "--bus.endpoints.monitor-view", bus, "--api-key", "wrong"),
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "refused the live view: wrong or missing api key" in result.stderr


def test_tail_says_when_no_monitor_answers(folder: Path):
    result = subprocess.run(
        rlbus("tail", "--once", "--timeout-s", "0.5", "--bus.endpoints.monitor-view", f"ipc://{folder}/nobody"),
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and f"no answer from the monitor at ipc://{folder}/nobody" in result.stderr


def test_sigterm_releases_waiting_steps_and_exits_0(folder: Path):
    process = MonitorProcess(folder / "stop")
    try:
        telemetry = process.telemetry("orchestrator", "orchestrator-0")
        telemetry.metrics(5, {"reward/all/mean": 0.75})
        telemetry.event("marker", "all sent")
        process.wait_view(lambda s: any("marker: all sent" in line for line in s.log_lines), "the marker event")
    finally:
        output = process.stop()
    assert process.proc.returncode == 0, output
    log = (process.output_dir / "logs" / "monitor.log").read_text()
    assert "step 5 | reward/all/mean 0.75 | (no report from trainer)" in log
    assert "monitor stopped" in log
    # The run's charts, drawn as the monitor stopped: reward only, the one figure reported.
    assert [p.name for p in (process.output_dir / "charts").iterdir()] == ["reward.png"]
