"""Runs the process table: start in order, watch, and stop everything on the first reason to.

:class:`RunState` is the decision logic (what an exit or a signal means);
:class:`Supervisor` owns the processes and signals. The run ends when

- the orchestrator exits 0: the run is done; the trainer gets ``stop_timeout_s``
  to finish on its own, the rest are stopped, exit 0;
- any service exits otherwise (non-zero, killed, or 0 while it should keep
  serving): the rest are stopped, exit 1, naming the service, its exit code,
  its output file and the last lines of it; unless ``max_restarts`` allows
  another restart of that service: it is started again with the same command
  and resumes from the run's checkpoints, and the others go on;
- the launcher gets SIGINT (Ctrl-C) or SIGTERM: everything is stopped, exit 130 / 143.

Stopping sends SIGTERM to each service's process group, waits up to
``stop_timeout_s`` and then sends SIGKILL. The monitor is stopped last, so it
still records what the others say while they stop. A second Ctrl-C kills at once.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from loguru import logger

from rlbus.services.launcher.processes import Child, CommandFor, ProcessSpec, describe_exit

NUM_TAIL_LINES = 20
SAFETY_POLL_S = 1.0
"""Children are also polled this often, in case a wake-up was missed."""


class Phase(Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    KILLING = "killing"


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    reason: str
    failed: str | None = None
    """Name of the process whose exit ended the run as a failure."""


class RunState:
    """What each exit or signal means for the run (no processes here)."""

    def __init__(self, specs: list[ProcessSpec], max_restarts: int = 0) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.phase = Phase.RUNNING
        self.result: RunResult | None = None
        self.max_restarts = max_restarts
        self.restarts: dict[str, int] = dict.fromkeys(self.specs, 0)

    def should_restart(self, name: str, code: int) -> bool:
        """True (and counted) when ``name`` failed with ``code`` and may be started again."""
        spec = self.specs[name]
        failed = code != 0 or spec.clean_exit == "failure"
        if self.phase is not Phase.RUNNING or not failed or self.restarts[name] >= self.max_restarts:
            return False
        self.restarts[name] += 1
        return True

    def on_exit(self, name: str, code: int) -> bool:
        """Record that ``name`` exited with ``code``; True when everything must now stop."""
        if self.phase is not Phase.RUNNING:
            return False
        spec = self.specs[name]
        if code == 0 and spec.clean_exit == "done":
            return self._stop(RunResult(0, f"{name} finished: the run is done"))
        if code == 0 and spec.clean_exit == "finished":
            return False
        what = "exited with code 0 while it should keep running" if code == 0 else describe_exit(code)
        return self._stop(RunResult(1, f"{name} {what}", failed=name))

    def on_signal(self, signum: int) -> bool:
        """A signal to the launcher: the first stops the run gracefully, the next kills."""
        if self.phase is Phase.RUNNING:
            name = signal.Signals(signum).name
            return self._stop(RunResult(128 + signum, f"the launcher got {name}: stopping every service"))
        self.phase = Phase.KILLING
        return True

    def _stop(self, result: RunResult) -> bool:
        self.result, self.phase = result, Phase.STOPPING
        return True


class Supervisor:
    """Starts the processes of ``specs`` and runs them until :class:`RunState` says stop.

    :meth:`run` must be called from the main thread: it handles SIGINT, SIGTERM and SIGCHLD.
    """

    def __init__(self, specs: list[ProcessSpec], command_for: CommandFor, logs_dir: Path, stop_timeout_s: float,
                 env: dict[str, str] | None = None, max_restarts: int = 0) -> None:  # fmt: skip
        self.specs, self.command_for, self.logs_dir = specs, command_for, logs_dir
        self.stop_timeout_s, self.env = stop_timeout_s, env
        self.state = RunState(specs, max_restarts)
        self.children: list[Child] = []
        self._signals: list[int] = []

    def run(self) -> RunResult:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with _Wakeup(self._signals) as wakeup:
            try:
                self._start_all()
                while self.state.phase is Phase.RUNNING:
                    wakeup.wait(SAFETY_POLL_S)
                    self._handle_events()
            finally:
                self._stop_all(wakeup)
        assert self.state.result is not None
        self._report(self.state.result)
        return self.state.result

    def _start_all(self) -> None:
        for spec in self.specs:
            argv = self.command_for(spec)
            child = Child.start(spec, argv, self.logs_dir, self.env)
            self.children.append(child)
            where = "console" if child.output_path is None else child.output_path
            logger.info("started {} (pid {}): {}  [output: {}]", spec.name, child.pid, " ".join(argv), where)
            self._handle_events()  # a child that died at once stops the start
            if self.state.phase is not Phase.RUNNING:
                return

    def _handle_events(self) -> None:
        while self._signals:
            self.state.on_signal(self._signals.pop(0))
        for child in self.children:
            if child.exit_code is None and child.poll() is not None:
                self._on_exit(child)

    def _on_exit(self, child: Child) -> None:
        code = child.exit_code
        assert code is not None
        name = child.spec.name
        if self.state.should_restart(name, code):
            child.signal_group(signal.SIGKILL)  # what it spawned (vLLM's engine) must not outlive it
            restarted = Child.start(child.spec, self.command_for(child.spec), self.logs_dir, self.env)
            self.children[self.children.index(child)] = restarted
            logger.warning("{} {}: restarted it with the same command (pid {}, restart {} of {})", name,
                           describe_exit(code), restarted.pid, self.state.restarts[name], self.state.max_restarts)
            return
        self.state.on_exit(name, code)
        if self.state.phase is Phase.RUNNING:
            logger.info("{} finished its part (exit 0); the run goes on", child.spec.name)
        else:
            failed = self.state.result is not None and self.state.result.failed == child.spec.name
            logger.log("WARNING" if failed else "INFO", "{} {}", child.spec.name, describe_exit(code))

    def _stop_all(self, wakeup: _Wakeup) -> None:
        if self.state.result is None:  # an exception (e.g. a command that cannot start) ended the run
            self.state.result = RunResult(1, "the launcher failed while starting services")
            self.state.phase = Phase.STOPPING
        if self.state.result.exit_code == 0:
            self._await_finishers(wakeup)
        # Everything but the monitor first, then the monitor, so it records the others stopping.
        others = [c for c in self.children if c.spec.name != "monitor"]
        monitor = [c for c in self.children if c.spec.name == "monitor"]
        for group in (others, monitor):
            self._stop_group(group, wakeup)

    def _await_finishers(self, wakeup: _Wakeup) -> None:
        """After a successful run, give services that end on their own (the trainer after its
        last step) ``stop_timeout_s`` to do so: a SIGTERM could cut off their last report."""
        finishers = [c for c in self.children if c.spec.clean_exit == "finished" and c.poll() is None]
        if finishers:
            names = ", ".join(c.spec.name for c in finishers)
            logger.info("waiting up to {:g}s for {} to finish on its own", self.stop_timeout_s, names)
            self._wait_exits(finishers, time.monotonic() + self.stop_timeout_s, wakeup)

    def _wait_exits(self, children: list[Child], deadline: float, wakeup: _Wakeup) -> None:
        """Until every one of ``children`` exited, the deadline passed, or a second signal came."""
        while any(c.poll() is None for c in children) and time.monotonic() < deadline:
            if self.state.phase is Phase.KILLING:
                return
            wakeup.wait(min(SAFETY_POLL_S, max(0.0, deadline - time.monotonic())))
            self._handle_events()

    def _stop_group(self, children: list[Child], wakeup: _Wakeup) -> None:
        running = [c for c in children if c.poll() is None]
        for child in running:
            logger.info("stopping {} (pid {})", child.spec.name, child.pid)
            child.signal_group(signal.SIGTERM)
        self._wait_exits(running, time.monotonic() + self.stop_timeout_s, wakeup)
        for child in children:
            if child.poll() is None:
                logger.warning("{} did not stop within {:g}s: killing it", child.spec.name, self.stop_timeout_s)
            # Also reaches what a service spawned and left behind in its group.
            child.signal_group(signal.SIGKILL)
            child.popen.wait()
            child.poll()

    def _report(self, result: RunResult) -> None:
        if result.failed is None:
            log = logger.info if result.exit_code == 0 else logger.warning
            log("run ended: {}", result.reason)
            return
        child = next(c for c in self.children if c.spec.name == result.failed)
        where = child.output_path or child.service_log
        lines = "\n".join(f"    {line}" for line in child.tail(NUM_TAIL_LINES)) or "    (no output)"
        logger.error(
            "run FAILED: {}; the other services were stopped.\n  its output: {}\n  its log: {}\n"
            "  last lines of {}:\n{}", result.reason, where, child.service_log, where.name, lines,
        )  # fmt: skip


class _Wakeup:
    """Wakes the supervisor on SIGCHLD, SIGINT and SIGTERM through a self-pipe (no sleeping poll).

    SIGINT and SIGTERM are recorded in ``signals`` for :class:`RunState`; SIGCHLD only wakes.
    """

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)

    def __init__(self, signals: list[int]) -> None:
        self.signals = signals
        self.selector = selectors.DefaultSelector()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self.selector.register(self._read_fd, selectors.EVENT_READ)
        self._previous: dict[int, object] = {}
        self._previous_wakeup_fd = -1

    def __enter__(self) -> _Wakeup:
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self.HANDLED:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        self.selector.close()
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGCHLD:
            self.signals.append(signum)

    def wait(self, timeout_s: float) -> None:
        """Return when a signal arrived (or after ``timeout_s``), emptying the pipe."""
        if self.selector.select(timeout_s):
            try:
                while os.read(self._read_fd, 4096):
                    pass
            except BlockingIOError:
                pass
