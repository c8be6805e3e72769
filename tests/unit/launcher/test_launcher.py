"""The real launcher (``run_rl`` in its own process) supervising trivial stand-in services.

Each stand-in (``fake_service``) spawns a grandchild and reports ``ready`` to the
test's ROUTER, then obeys the test's commands; nothing here sleeps. Afterwards
every child and grandchild must be gone (checked with pidfds, Linux).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

ROOT = Path(__file__).resolve().parents[3]
NAMES = ["monitor", "inference", "trainer", "orchestrator", "env-worker-0", "env-worker-1"]
DEADLINE_S = 120.0

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds to watch processes")


class FakeRun:
    """``fake_run`` as a subprocess plus the control socket its stand-ins report to."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.output_dir = folder / "run"
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted stand-in takes over its name
        endpoint = f"ipc://{folder}/control"
        self.control.bind(endpoint)
        self.output_file = folder / "launcher.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
        with self.output_file.open("wb") as output:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.unit.launcher.fake_run", endpoint, "--output-dir", str(self.output_dir),
                 "--num-env-workers", "2", *args],
                cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.pids: dict[str, tuple[int, int]] = {}

    def wait_ready(self, names: list[str] = NAMES) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not set(names) <= set(self.pids):
            if not self.control.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                raise AssertionError(f"only {sorted(self.pids)} reported ready:\n{self.output()}")
            identity, text = self.control.recv_multipart()
            _, pid, grandchild = text.decode().split()
            self.pids[identity.decode()] = (int(pid), int(grandchild))

    def tell(self, name: str, command: str) -> None:
        self.control.send_multipart([name.encode(), command.encode()])

    def ask(self, name: str, command: str) -> str:
        self.tell(name, command)
        assert self.control.poll(int(DEADLINE_S * 1000)), f"{name} did not answer {command!r}"
        return self.control.recv_multipart()[1].decode()

    def wait(self) -> int:
        return self.proc.wait(timeout=DEADLINE_S)

    def output(self) -> str:
        return self.output_file.read_text()

    def all_pids(self) -> list[int]:
        return [pid for pair in self.pids.values() for pid in pair]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.all_pids():  # never leave a stand-in behind, even when a test failed
            _kill_quietly(pid)
        self.control.close()
        self.context.term()


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_gone(pids: list[int], timeout_s: float = DEADLINE_S) -> list[int]:
    """Pids still running after ``timeout_s`` (a pidfd turns readable when its process exits)."""
    deadline, alive = time.monotonic() + timeout_s, []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
        if not readable:
            alive.append(pid)
    return alive


@pytest.fixture
def folder() -> Iterator[Path]:
    # ipc paths must stay under ~100 bytes, so not under pytest's long tmp_path.
    path = Path(tempfile.mkdtemp(prefix="rlbus-launch-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_factory(folder: Path) -> Iterator:
    runs: list[FakeRun] = []

    def make(*args: str) -> FakeRun:
        runs.append(FakeRun(folder, *args))
        return runs[-1]

    yield make
    for run in runs:
        run.close()


@pytest.mark.slow
def test_a_failing_service_stops_the_run_naming_it_its_code_and_its_output(run_factory):
    run = run_factory()
    run.wait_ready()
    run.tell("trainer", "exit 3")
    assert run.wait() == 1
    text = run.output()
    trainer_out = run.output_dir / "logs" / "trainer.out"
    assert "run FAILED: trainer exited with code 3; the other services were stopped." in text
    assert f"its output: {trainer_out}" in text and f"its log: {run.output_dir / 'logs' / 'trainer.log'}" in text
    assert "trainer: boom, exiting as told" in text  # the last lines of its output
    assert wait_gone(run.all_pids()) == []


@pytest.mark.slow
def test_orchestrator_exit_0_ends_the_run_and_stops_the_monitor_last(run_factory):
    run = run_factory()
    run.wait_ready()
    run.tell("trainer", "exit 0")  # its last step trained: the run goes on
    assert wait_gone([run.pids["trainer"][0]]) == []
    run.tell("orchestrator", "exit 0")
    assert run.wait() == 0, run.output()
    text = run.output()
    assert "orchestrator finished: the run is done" in text and "run FAILED" not in text
    assert "trainer finished its part (exit 0); the run goes on" in text
    stops = [line.split("stopping ")[1].split()[0] for line in text.splitlines() if "| stopping " in line]
    assert stops[-1] == "monitor" and set(stops) == {"monitor", "inference", "env-worker-0", "env-worker-1"}
    assert "trainer" not in stops
    assert wait_gone(run.all_pids()) == []


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_launcher_stops_everything_with_no_orphans(run_factory, signum, code):
    run = run_factory()
    run.wait_ready()
    run.proc.send_signal(signum)
    assert run.wait() == code, run.output()
    assert f"the launcher got {signal.Signals(signum).name}: stopping every service" in run.output()
    assert wait_gone(run.all_pids()) == []


@pytest.mark.slow
def test_after_the_orchestrator_finishes_the_trainer_gets_time_to_finish_its_last_step(run_factory):
    run = run_factory("--stop-timeout-s", "1")
    run.wait_ready()
    run.tell("orchestrator", "exit 0")  # the trainer is never told: it is stopped once its time is up
    assert run.wait() == 0, run.output()
    text = run.output()
    assert text.index("waiting up to 1s for trainer to finish on its own") < text.index("stopping trainer")
    assert wait_gone(run.all_pids()) == []


@pytest.mark.slow
def test_a_service_that_ignores_sigterm_is_killed_after_the_stop_timeout(run_factory):
    run = run_factory("--stop-timeout-s", "1")
    run.wait_ready()
    assert run.ask("inference", "ignore-sigterm") == "ok"
    run.tell("orchestrator", "exit 0")
    assert run.wait() == 0, run.output()
    assert "inference did not stop within 1s: killing it" in run.output()
    assert wait_gone(run.all_pids()) == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")
def test_kill_9_of_the_launcher_still_stops_every_service(run_factory):
    run = run_factory()
    run.wait_ready()
    run.proc.kill()
    run.proc.wait()
    # Each service gets SIGTERM from the kernel (PR_SET_PDEATHSIG); what it spawned is its own business.
    services = [pid for pid, _ in run.pids.values()]
    assert wait_gone(services) == []


@pytest.mark.slow
def test_a_command_that_cannot_start_stops_those_already_started(run_factory):
    run = run_factory("--missing", "orchestrator")
    assert run.wait() == 1
    text = run.output()
    assert "No such file or directory: '/nonexistent/rlbus-service'" in text
    started = {line.split("started ")[1].split()[0]: int(line.split("(pid ")[1].split(")")[0])
               for line in text.splitlines() if "| started " in line}  # fmt: skip
    assert list(started) == ["monitor", "inference", "trainer"]
    assert "stopping monitor" in text
    assert wait_gone(list(started.values())) == []


@pytest.mark.slow
def test_with_max_restarts_a_killed_service_is_started_again_and_the_run_goes_on(run_factory):
    run = run_factory("--max-restarts", "1")
    run.wait_ready()
    first = run.pids.pop("trainer")
    os.kill(first[0], signal.SIGKILL)
    run.wait_ready()  # the same command again
    assert run.pids["trainer"][0] != first[0]
    assert wait_gone(list(first)) == []  # its grandchild went with it
    run.tell("trainer", "exit 3")  # no restart left: now the run fails
    assert run.wait() == 1
    text = run.output()
    assert "trainer was killed by SIGKILL: restarted it with the same command" in text
    assert "run FAILED: trainer exited with code 3" in text
    assert wait_gone(run.all_pids()) == []
