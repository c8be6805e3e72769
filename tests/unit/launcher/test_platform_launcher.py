"""The real launcher (``run_rl``, stand-in services) and the Prime platform: it registers the run before any
service starts, hands the id to the monitor in its resolved config, and marks the run once every
service stopped: completed after a clean end, failed with the supervisor's reason otherwise."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlbus.config import read_toml
from tests.integration.platform_server import PlatformServer
from tests.unit.launcher.test_launcher import FakeRun, wait_gone

KEY = "sk-launcher-key"

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds to watch processes")


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rlbus-platform-", dir="/tmp"))  # ipc paths stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PlatformServer]:
    monkeypatch.setenv("HOME", str(folder))
    monkeypatch.setenv("PRIME_API_KEY", KEY)
    monkeypatch.delenv("PRIME_TEAM_ID", raising=False)
    with PlatformServer(api_key=KEY) as running:
        yield running


@pytest.fixture
def platform_run(folder: Path, server: PlatformServer) -> Iterator[FakeRun]:
    run = FakeRun(folder, "--prime-platform.base-url", server.base_url, "--prime-platform.team-id", "team-7",
                  "--max-steps", "3")  # fmt: skip
    yield run
    run.close()


def test_registered_before_start_and_marked_completed_after_the_monitor_stopped(platform_run, server):
    platform_run.wait_ready()
    (registration,) = server.of("register")  # before any service could report ready
    assert registration.body["team_id"] == "team-7" and registration.body["max_steps"] == 3
    monitor = read_toml(platform_run.output_dir / "configs" / "monitor.toml")
    assert monitor["prime_platform"]["run_id"] == "run-1"
    platform_run.tell("trainer", "exit 0")
    assert wait_gone([platform_run.pids["trainer"][0]]) == []
    platform_run.tell("orchestrator", "exit 0")
    assert platform_run.wait() == 0, platform_run.output()
    assert [r.body for r in server.of("status")] == [{"status": "completed"}]
    text = platform_run.output()
    assert text.index("stopping monitor") < text.index("prime platform: marked run run-1 completed")
    assert KEY not in text and not any(KEY in p.read_text(errors="ignore")
                                       for p in platform_run.output_dir.rglob("*") if p.is_file())  # fmt: skip


@pytest.mark.parametrize(
    ("end", "code", "reason"),
    [("trainer-exit-3", 1, "trainer exited with code 3"), ("kill-9-inference", 1, "inference was killed by SIGKILL"),
     ("ctrl-c", 130, "the launcher got SIGINT: stopping every service")],
)  # fmt: skip
def test_a_run_that_fails_is_killed_or_interrupted_is_marked_failed_with_the_reason(platform_run, server, end, code,
                                                                                      reason):  # fmt: skip
    platform_run.wait_ready()
    if end == "trainer-exit-3":
        platform_run.tell("trainer", "exit 3")
    elif end == "kill-9-inference":
        os.kill(platform_run.pids["inference"][0], signal.SIGKILL)
    else:
        platform_run.proc.send_signal(signal.SIGINT)
    assert platform_run.wait() == code, platform_run.output()
    assert [r.body for r in server.of("status")] == [{"status": "failed", "error_message": reason}]
    assert len(server.of("register")) == 1
    assert wait_gone(platform_run.all_pids()) == []
