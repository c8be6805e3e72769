"""The dashboard in a real headless browser (Debian's Chromium): a tiny `rlbus rl` run's live page
shows each step within a second of its row, with the numbers of metrics.jsonl; then `rlbus dashboard`
serves the finished run's folder on a non-loopback host, where a request without the key is refused;
and the health table marks DEAD and STALLED replicas.

Screenshots go to the test's tmp dir, and also to ``$RLBUS_DASHBOARD_SCREENSHOTS`` when set.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rlbus.jsonl import read_json_objects as read_jsonl
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.monitor.dashboard_server import DashboardServer, missing_static_files
from rlbus.services.monitor.dashboard_state import Dashboard
from tests.conftest import free_tcp_port
from tests.integration.browser import full_page_screenshot, headless_chromium, wait_until
from tests.integration.small_run import TRAINING_TOML, loopback_endpoints
from tests.integration.test_live_tailing import reachable_address

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 4
WATCHED_STEP = 2
"""The step the live page is watched for, while the run goes on."""
START_S = 600.0  # vLLM on a loaded 2-core machine
KEY = "dashboard-test-key"
REWARD = "orchestrator/reward/all/mean"


def run_config(tmp_path: Path, model: Path, dashboard_port: int) -> Path:
    path = tmp_path / "rl.toml"
    path.write_text(f"""
model = "{model}"
output_dir = "{tmp_path / "run"}"
max_steps = {MAX_STEPS}

[bus.endpoints]
{loopback_endpoints()}

[inference]
port = {free_tcp_port()}
max_model_len = 512

{TRAINING_TOML}
[monitor]
dashboard = "127.0.0.1:{dashboard_port}"
""")
    return path


def readouts(driver: Any) -> list[dict[str, str]]:
    """Each chart line's latest point as the page shows it (the readout rows' data-* attributes)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.chart-card:not([hidden]) table.readout tr')]"
        ".map(row => ({chart: row.closest('.chart-card').dataset.chart, ...row.dataset}))"
    )


def chart_points(driver: Any, chart: str) -> list[list[float | None]]:
    """What uPlot draws in ``chart``: [steps, values of each line...]."""
    return driver.execute_script(f"return window.rlbusDashboard.plots['{chart}'].uplot.data")


def reward_at(driver: Any, step: int) -> dict[str, str] | None:
    found = [r for r in readouts(driver) if r["key"] == REWARD and int(r["step"]) >= step]
    return found[0] if found else None


def watch_steps(driver: Any, until_step: int) -> dict[int, float]:
    """When (this clock) the page first showed each step on its reward chart, up to ``until_step``."""
    seen_at: dict[int, float] = {}

    def reached() -> bool:
        shown = [int(r["step"]) for r in readouts(driver) if r["key"] == REWARD]
        if shown and shown[0] not in seen_at:
            seen_at[shown[0]] = time.time()
        return bool(shown) and shown[0] >= until_step

    wait_until(reached, START_S, f"the reward chart at step {until_step}", interval_s=0.05)
    return seen_at


HEALTH_ROWS = """return [...document.querySelectorAll('#health tbody tr')]
    .map(row => [row.dataset.replica, row.children[2].textContent, row.className])"""


def page_is_up(driver: Any, url: str) -> bool:
    try:
        driver.get(url)
    except Exception:  # noqa: BLE001 - a refused connection, while the monitor starts
        return False
    return driver.title == "rlbus dashboard"


def keep_screenshot(path: Path) -> None:
    target = os.environ.get("RLBUS_DASHBOARD_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def reported(run: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """metrics.jsonl by (service, step): the last report of each (a service reports a step once here)."""
    return {(m["service"], m["step"]): m for m in read_jsonl(run / "metrics.jsonl")}


def check_against_metrics(lines: list[dict[str, str]], run: Path) -> int:
    """Each step reporter's line shows what it reported at that step in metrics.jsonl; how many were checked."""
    reports = reported(run)
    checked = 0
    for line in lines:
        service, _, name = line["key"].partition("/")
        if service in ("orchestrator", "trainer"):
            assert float(line["value"]) == reports[(service, int(line["step"]))][name], line
            checked += 1
    return checked


@pytest.mark.vllm
def test_live_page_follows_the_run_and_rlbus_dashboard_guards_a_remote_bind(tmp_path):
    if missing_static_files():  # a fresh clone before scripts/setup_env.sh: bundle uPlot now
        subprocess.run(["bash", str(ROOT / "scripts" / "build_dashboard.sh")], check=False, timeout=600)
    assert not missing_static_files(), "the page is not built: run scripts/build_dashboard.sh (needs npm)"
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    port = free_tcp_port()
    run, shots = tmp_path / "run", tmp_path / "screenshots"
    with (tmp_path / "rl.log").open("w") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "rlbus", "rl", "@", str(run_config(tmp_path, model, port))],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with headless_chromium() as driver:
            wait_until(lambda: page_is_up(driver, f"http://127.0.0.1:{port}/"), START_S, "the monitor's dashboard")
            page_up_at = time.time()
            seen_at = watch_steps(driver, WATCHED_STEP)
            shown = reward_at(driver, WATCHED_STEP)
            assert shown is not None
            keep_screenshot(full_page_screenshot(driver, shots / "live.png"))
            live_points, live_lines = chart_points(driver, "reward"), readouts(driver)
            health = driver.execute_script(
                "return [...document.querySelectorAll('#health tbody tr')].map(r => r.dataset.replica)"
            )
        assert launcher.wait(timeout=START_S) == 0, (tmp_path / "rl.log").read_text()[-4000:]
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=120)

    # Each step shown within a second of its row being written (the row's time), without a reload.
    written = {row["step"]: row["time"] for row in read_jsonl(run / "steps.jsonl")}
    delays = {step: round(at - written[step], 3) for step, at in seen_at.items() if written[step] > page_up_at}
    assert delays and max(delays.values()) < 1.0, delays
    reports = reported(run)
    assert float(shown["value"]) == reports[("orchestrator", int(shown["step"]))]["reward/all/mean"], shown
    assert check_against_metrics(live_lines, run) >= 8  # reward, loss, entropy, KL, off-policy, timings
    steps, rewards = live_points[0], live_points[1]  # what uPlot draws: every step so far, as reported
    assert steps[:WATCHED_STEP] == list(range(1, WATCHED_STEP + 1))
    assert rewards == [reports[("orchestrator", step)]["reward/all/mean"] for step in steps]
    assert any(replica.startswith("trainer") for replica in health), health
    check_finished_run_page(run, shots)


def check_finished_run_page(run: Path, shots: Path) -> None:
    """`rlbus dashboard` on every interface: 401 without the key; with it, the whole run as the files say."""
    port, host = free_tcp_port(), reachable_address()
    env = {**os.environ, "RLBUS_MONITOR__VIEW_API_KEY": KEY}
    server = subprocess.Popen([sys.executable, "-m", "rlbus", "dashboard", str(run), "--host", "0.0.0.0", "--port",
                               str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert "dashboard of 1 run(s)" in (server.stdout.readline() if server.stdout else "")
        assert status(host, port, "/", {}) == 401
        assert status(host, port, "/api/state", {"Authorization": "Bearer wrong"}) == 401
        assert status(host, port, "/api/state", {"Authorization": f"Bearer {KEY}"}) == 200
        with headless_chromium() as driver:
            driver.get(f"http://{host}:{port}/?key={KEY}")
            wait_until(lambda: reward_at(driver, MAX_STEPS), 30, f"the reward chart at step {MAX_STEPS}")
            keep_screenshot(full_page_screenshot(driver, shots / "finished.png"))
            shown = readouts(driver)
            samples = driver.execute_script("return document.querySelectorAll('#samples tbody tr').length")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    last_row = read_jsonl(run / "steps.jsonl")[-1]
    step_lines = [r for r in shown if not r["key"].startswith("eval/")]
    assert {r["chart"] for r in step_lines} >= {"reward", "loss", "entropy", "mismatch_kl", "throughput", "step_time"}
    for line in step_lines:  # every line's latest value is the last row's
        assert int(line["step"]) == last_row["step"] and float(line["value"]) == last_row[line["key"]], line
    assert check_against_metrics(step_lines, run) >= 8
    assert samples > 0


def status(host: str, port: int, path: str, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", path, headers=headers)
    return connection.getresponse().status


def test_health_table_shows_dead_and_stalled_replicas_in_red(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "steps.jsonl").write_text(json.dumps({"step": 1, "time": 1.0, "elapsed_s": 1.0, REWARD: 0.5}) + "\n")
    dashboard = Dashboard.of_folders([(run, "run")], live=True)
    rows = [{"service": service, "replica_id": f"{service}-0", "status": status, "alive": status != "dead",
             "last_seen": time.time(), "step": 1, "waiting_for": None, "waiting_since": None, "host": "h", "pid": 1}
            for service, status in (("trainer", "dead"), ("orchestrator", "stalled"), ("inference", "ready"))]  # fmt: skip
    dashboard.set_health(rows)
    server = DashboardServer(dashboard, "127.0.0.1", 0).start()
    try:
        with headless_chromium() as driver:
            driver.get(server.url)
            shown = wait_until(lambda: driver.execute_script(HEALTH_ROWS), 30, "the health table")
    finally:
        server.stop()
    assert shown == [["trainer-0", "DEAD", "bad"], ["orchestrator-0", "STALLED", "bad"], ["inference-0", "ready", ""]]


def test_several_runs_are_overlaid_one_line_per_run(tmp_path):
    folders = []
    for name, rewards in (("baseline", [0.25, 0.5]), ("tuned", [0.5, 0.75, 1.0])):
        (tmp_path / name).mkdir()
        rows = [{"step": step, "time": float(step), "elapsed_s": float(step), REWARD: reward}
                for step, reward in enumerate(rewards, start=1)]  # fmt: skip
        (tmp_path / name / "steps.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        folders.append((tmp_path / name, name))
    server = DashboardServer(Dashboard.of_folders(folders), "127.0.0.1", 0).start()
    try:
        with headless_chromium() as driver:
            driver.get(server.url)
            wait_until(lambda: len(readouts(driver)) == 2, 30, "a reward line per run")
            lines = {(r["run"], int(r["step"]), float(r["value"])) for r in readouts(driver)}
            drawn = chart_points(driver, "reward")
    finally:
        server.stop()
    assert lines == {("baseline", 2, 0.5), ("tuned", 3, 1.0)}
    assert drawn == [[1, 2, 3], [0.25, 0.5, None], [0.5, 0.75, 1.0]]  # one x axis, a line per run
