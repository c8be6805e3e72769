"""Real tiny runs (``rlbus rl``: five real services, vLLM on CPU) streaming to a local Prime platform.

Each test runs the real command against :class:`~tests.integration.platform_server.PlatformServer`,
which records every request: registration with the run's fields and the team by the documented
order, metrics for every step in order (through a 500 that is retried), samples, ``completed``
exactly once; ``failed`` with the reason when a service is killed and on Ctrl-C; ``failed`` by the
monitor when the launcher itself is killed with -9; and a platform that goes down mid-run, which
costs no step (the drops are counted). No file or log holds the key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlbus.config import read_toml
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.conftest import free_tcp_port
from tests.integration.platform_server import PlatformServer, first_steps
from tests.integration.run_processes import kill_all, wait_all_gone
from tests.integration.small_run import TRAINING_TOML, loopback_endpoints

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-e2e-platform-key-7f3a"
MAX_STEPS = 2
DEADLINE_S = 900


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(out, TinyModelConfig(out=out))


@pytest.fixture
def server() -> Iterator[PlatformServer]:
    with PlatformServer(api_key=KEY) as running:
        yield running


class Run:
    """``rlbus rl`` as a subprocess, its console captured to a file."""

    def __init__(self, tmp_path: Path, model: Path, platform_toml: str, *flags: str, max_steps: int = MAX_STEPS,
                 **env: str) -> None:  # fmt: skip
        self.output_dir = tmp_path / "run"
        config = tmp_path / "rl.toml"
        config.write_text(f"""
model = "{model}"
output_dir = "{self.output_dir}"
max_steps = {max_steps}

[bus.endpoints]
{loopback_endpoints()}

[inference]
port = {free_tcp_port()}
max_model_len = 512

{TRAINING_TOML}
{platform_toml}
""")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLBUS_", "PRIME_", "WANDB_"))}
        self.console = tmp_path / "console.txt"
        with self.console.open("wb") as output:
            self.proc = subprocess.Popen([sys.executable, "-m", "rlbus", "rl", "@", str(config), *flags], cwd=ROOT,
                                         env={**clean, "HOME": str(tmp_path), **env}, stdout=output,
                                         stderr=subprocess.STDOUT)  # fmt: skip

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def output(self) -> str:
        return self.console.read_text(errors="replace")

    def child_pid(self, service: str) -> int:
        """The pid of the launcher's child running ``rlbus <service>``."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and service.encode() in argv[3:4]:
                return int(stat.parent.name)
        raise AssertionError(f"no {service} process under the launcher")

    def holds_key(self) -> list[str]:
        """Files of the run folder, and the console, that contain the key."""
        found = [str(p) for p in self.output_dir.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
        return found + (["console"] if KEY in self.output() else [])


def test_a_run_streams_every_step_and_samples_and_is_marked_completed_once(tmp_path, tiny_model, server):
    server.fail("metrics", 500)  # the first metrics upload: retried, nothing lost
    run = Run(tmp_path, tiny_model, '[prime_platform]\nrun_name = "e2e"\nteam_id = "config-team"\n'
              f'base_url = "{server.base_url}"\n', PRIME_API_KEY=KEY, PRIME_TEAM_ID="env-team")  # fmt: skip
    assert run.wait() == 0, run.output()[-4000:]

    (registration,) = server.of("register")
    body = registration.body
    assert (body["base_model"], body["max_steps"], body["name"], body["team_id"]) == (
        str(tiny_model), MAX_STEPS, "e2e", "config-team",
    )  # fmt: skip
    assert body["environments"] == [{"id": "reverse-text"}]
    assert (body["batch_size"], body["rollouts_per_example"], body["seq_len"]) == (8, 4, 512)
    assert "dashboard/training/run-1" in run.output()  # the launcher printed where to watch

    metrics = server.of("metrics", ok_only=False)
    assert metrics[0].status == 500 and metrics[1].body["metrics"]["step"] == metrics[0].body["metrics"]["step"]
    trained = [s for s in first_steps(server) if s >= 1]
    assert trained == list(range(1, MAX_STEPS + 1)), first_steps(server)
    last_row = {r.body["metrics"]["step"]: r.body["metrics"] for r in server.of("metrics")}
    assert all("loss/mean" in last_row[s] and "reward/all/mean" in last_row[s] for s in trained), last_row

    (confirm,) = server.of("confirm")
    assert confirm.body["run_id"] == "run-1" and confirm.body["step"] >= 1
    assert len(server.of("upload")[0].body) > 0

    statuses = server.of("status")
    assert [r.body for r in statuses] == [{"status": "completed"}]
    assert server.requests.index(statuses[0]) == len(server.requests) - 1  # after every upload
    assert read_toml(run.output_dir / "configs" / "monitor.toml")["prime_platform"]["run_id"] == "run-1"
    assert "run_id" not in read_toml(run.output_dir / "configs" / "rl.toml")["prime_platform"]  # a rerun registers anew
    assert run.holds_key() == []


def test_ctrl_c_marks_the_run_failed(tmp_path, tiny_model, server):
    prime = tmp_path / ".prime"
    prime.mkdir()
    (prime / "config.json").write_text(json.dumps({"api_key": KEY, "team_id": "file-team"}))
    run = Run(tmp_path, tiny_model, "", "--orchestrator.prime-monitor", "--prime-platform.base-url", server.base_url,
              PRIME_TEAM_ID="env-team")  # fmt: skip
    server.wait_for(lambda s: 1 in first_steps(s), "step 1", timeout_s=DEADLINE_S)
    run.proc.send_signal(signal.SIGINT)
    assert run.wait() == 130, run.output()[-4000:]
    assert server.of("register")[0].body["team_id"] == "env-team"  # PRIME_TEAM_ID before the file's
    assert [r.body for r in server.of("status")] == [
        {"status": "failed", "error_message": "the launcher got SIGINT: stopping every service"},
    ]  # fmt: skip
    assert run.holds_key() == []


def test_a_killed_service_marks_the_run_failed_naming_it(tmp_path, tiny_model, server):
    run = Run(tmp_path, tiny_model, f'[prime_platform]\nbase_url = "{server.base_url}"\n', PRIME_API_KEY=KEY)
    server.wait_for(lambda s: 1 in first_steps(s), "step 1", timeout_s=DEADLINE_S)
    os.kill(run.child_pid("trainer"), signal.SIGKILL)
    assert run.wait() == 1, run.output()[-4000:]
    assert [r.body for r in server.of("status")] == [
        {"status": "failed", "error_message": "trainer was killed by SIGKILL"},
    ]  # fmt: skip


def test_a_launcher_killed_with_sigkill_is_marked_failed_by_its_monitor(tmp_path, tiny_model, server):
    # Many steps: the run must still be training when its launcher dies.
    run = Run(tmp_path, tiny_model, f'[prime_platform]\nbase_url = "{server.base_url}"\n', max_steps=200,
              PRIME_API_KEY=KEY)  # fmt: skip
    try:
        server.wait_for(lambda s: 1 in first_steps(s), "step 1", timeout_s=DEADLINE_S)
        run.proc.kill()  # the launcher only: its services get SIGTERM from the parent-death signal
        assert run.proc.wait() == -signal.SIGKILL
        server.wait_for(lambda s: s.of("status"), "the monitor marking the run", timeout_s=120)
        # No process of the run is left (every one of them has HOME=tmp_path), so none can mark again.
        assert wait_all_gone("HOME", str(tmp_path), timeout_s=120) == set()
    finally:
        kill_all("HOME", str(tmp_path))
    (status,) = server.of("status", ok_only=False)
    assert status.body["status"] == "failed", run.output()[-4000:]
    prefix = f"the launcher (pid {run.proc.pid}) died before the run ended; last step seen: "
    assert status.body["error_message"].startswith(prefix), status.body
    assert int(status.body["error_message"].removeprefix(prefix)) >= 1
    assert server.requests.index(status) == len(server.requests) - 1  # after every upload the monitor drained


def test_a_platform_that_goes_down_mid_run_costs_no_step(tmp_path, tiny_model, server):
    run = Run(tmp_path, tiny_model, f'[prime_platform]\nbase_url = "{server.base_url}"\n', PRIME_API_KEY=KEY)
    server.wait_for(lambda s: 1 in first_steps(s), "step 1", timeout_s=DEADLINE_S)
    server.go_down()
    assert run.wait() == 0, run.output()[-4000:]  # training finished all the same
    steps = [json.loads(line)["step"] for line in (run.output_dir / "steps.jsonl").read_text().splitlines()]
    assert set(range(1, MAX_STEPS + 1)) <= set(steps)
    monitor_log = (run.output_dir / "logs" / "monitor.log").read_text()
    assert "prime platform: sent" in monitor_log and "; dropped " in monitor_log, monitor_log[-3000:]
    assert "could not mark run run-1 completed" in run.output()
    assert server.of("status") == []
