"""Live tailing: `rlbus tail --monitor tcp://host:port` against a real monitor bound on all interfaces
(reached, as from another host, at this machine's non-loopback address, with CurveZMQ keys), and
scripts/tmux.sh opening one pane per service log plus one running `rlbus tail`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlbus.bus import Bus
from rlbus.config import BusConfig, BusEndpoints, write_toml
from rlbus.pubsub import TelemetryClient
from rlbus.services.run_config import RlConfig
from tests.conftest import free_tcp_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 90.0
SERVICES = ("monitor", "orchestrator", "trainer", "inference", "env-worker")


def rlbus(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlbus", *args]


def reachable_address() -> str:
    """An address of this machine other than loopback, as another host would use; else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
    return address if not address.startswith("127.") else "127.0.0.1"


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rlbus-live-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def monitor(run_dir: Path) -> Iterator[str]:
    """A real monitor whose live view answers on a non-default port on every interface; its address."""
    subprocess.run(rlbus("keys", "--out", str(run_dir / "keys")), cwd=ROOT, check=True, capture_output=True)
    view_port = free_tcp_port()
    endpoints = BusEndpoints(monitor_telemetry=f"tcp://127.0.0.1:{free_tcp_port()}",
                             monitor_view=f"tcp://127.0.0.1:{view_port}")  # fmt: skip
    bus = BusConfig(endpoints=endpoints, bind_host="0.0.0.0", curve={"keys_dir": str(run_dir / "keys")})
    config = RlConfig(output_dir=run_dir / "run", bus=bus)
    write_toml(config, run_dir / "run" / "configs" / "rl.toml")
    monitor_file = write_toml(config.monitor, run_dir / "monitor.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLBUS_", "WANDB_"))}
    proc = subprocess.Popen(rlbus("monitor", "@", str(monitor_file)), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with Bus(bus) as client:  # a service reporting to it, so the view has something to show
            TelemetryClient(client, "inference", "inference-remote").heartbeat(status="ready", step=4)
            yield f"tcp://{reachable_address()}:{view_port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tail_with_only_a_monitor_address_and_keys_shows_the_remote_run(monitor, run_dir):
    # No config file: everything from flags, as on a laptop with the keys copied over.
    keys = ["--bus.curve.keys-dir", str(run_dir / "keys")]
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = subprocess.run(rlbus("tail", "--monitor", monitor, *keys, "--json", "--once", "--timeout-s", "10"),
                                cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        # Until the monitor is up and has the heartbeat (pushed before it may have been listening).
        if (result.returncode == 0 and "inference-remote" in result.stdout) or time.monotonic() > deadline:
            break
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout.splitlines()[0])
    rows = {row["replica_id"]: row for row in snapshot["health"]}
    assert rows["inference-remote"]["step"] == 4 and rows["inference-remote"]["status"] == "ready", snapshot

    # The same address without keys is refused by Curve: the monitor never answers.
    refused = subprocess.run(rlbus("tail", f"--monitor={monitor}", "--once", "--timeout-s", "2"),
                             cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert refused.returncode == 1 and f"no answer from the monitor at {monitor}" in refused.stderr


@pytest.fixture
def tmux_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    if shutil.which("tmux") is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "ci" / "install_slurm.sh")], check=False, timeout=600)
    if shutil.which("tmux") is None:
        pytest.skip("tmux is missing and scripts/ci/install_slurm.sh could not install it: a CI setup bug")
    # A private tmux server (its socket under TMUX_TMPDIR), killed whatever happens.
    env = {**os.environ, "TMUX_TMPDIR": str(tmp_path), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    env.pop("TMUX", None)
    yield env
    subprocess.run(["tmux", "kill-server"], env=env, capture_output=True, timeout=60, check=False)


def pane_text(env: dict[str, str], target: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", target], env=env, capture_output=True, text=True,
                          timeout=60, check=False).stdout  # fmt: skip


def wait_pane(env: dict[str, str], target: str, text: str) -> str:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        shown = pane_text(env, target)
        if text in shown:
            return shown
        time.sleep(0.2)  # tmux has no notification for pane contents
    raise AssertionError(f"pane {target} never showed {text!r}; it shows:\n{shown}")


def test_tmux_opens_a_pane_per_service_log_and_one_with_rlbus_tail(monitor, run_dir, tmux_env):
    logs = run_dir / "run" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for service in SERVICES:
        (logs / f"{service}.log").write_text(f"hello from {service}\n")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "tmux.sh"), str(run_dir / "run"), "--detach",
                             "--session", "live", "--", "--monitor", monitor, "--bus.curve.keys-dir",
                             str(run_dir / "keys")],
                            env=tmux_env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    panes = subprocess.run(["tmux", "list-panes", "-t", "live:rlbus", "-F", "#{pane_index}|#{pane_title}"],
                           env=tmux_env, capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    titles = dict(line.split("|", 1) for line in panes.splitlines())
    assert sorted(titles.values()) == sorted(["rlbus tail", *SERVICES]), titles
    for index, title in titles.items():
        if title != "rlbus tail":
            wait_pane(tmux_env, f"live:rlbus.{index}", f"hello from {title}")
    # A line written later shows up: the panes follow the files.
    with (logs / "trainer.log").open("a") as log:
        log.write("step 7 done\n")
    trainer = next(index for index, title in titles.items() if title == "trainer")
    wait_pane(tmux_env, f"live:rlbus.{trainer}", "step 7 done")
    # The live view pane reached the monitor (a status line names the step; nothing failed).
    tail = wait_pane(tmux_env, "live:rlbus.0", "step ")
    assert "no answer" not in tail and "refused" not in tail, tail
