"""``rlbus rl --slurm``: submit the run as job arrays, follow it, cancel it (docs/slurm.md).

Submitting: one array per service, binding services first; each later array
gets the earlier arrays' job ids (its rendezvous, services/launcher/slurm_task.py)
and starts only after them (``--dependency=after``). The ids are kept in
``<output_dir>/slurm_jobs.json`` on this host for ``--slurm-cancel``.

Following: the controller is asked for every task's state each
``poll_interval_s``; changes are logged, and each running task's console output
is streamed from its node by ``srun --overlap tail -F`` (SLURM's own I/O
forwarding: no shared filesystem, and unlike ``sattach`` it works for batch
scripts), printed with the task's name and copied to ``<output_dir>/logs/<task>.out``.
What a task's end means is decided as for local processes
(:class:`~rlbus.services.launcher.supervisor.RunState`): the orchestrator ending with
0 finishes the run, any other end fails it. Then, or on Ctrl-C / SIGTERM,
every array is cancelled (the monitor last) and waited for: no task outlives
the launcher, except when the launcher itself is killed with -9 (then
``rlbus rl @ ... --slurm-cancel``).
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from loguru import logger

from rlbus.config.base import write_private
from rlbus.errors import UserError
from rlbus.services.launcher.processes import CleanExit, ProcessSpec
from rlbus.services.launcher.slurm_ctl import SlurmCtl, TaskState, expand_output_pattern
from rlbus.services.launcher.slurm_jobs import (
    array_jobs,
    check_binds_allowed,
    job_name,
    job_script,
    numbered_task_name,
    sbatch_args,
    workdir,
)  # fmt: skip
from rlbus.services.launcher.supervisor import Phase, RunResult, RunState, _Wakeup
from rlbus.services.run_config import RlConfig

JOBS_FILE = "slurm_jobs.json"
TAIL_JOIN_S = 10.0


@dataclass(frozen=True)
class SubmittedArray:
    section: str
    service: str
    array_job_id: str
    num_tasks: int
    job_name: str
    clean_exit: CleanExit

    def task_name(self, task_id: int) -> str:
        return numbered_task_name(self.section, self.service, self.num_tasks, task_id)


def submit(config: RlConfig, ctl: SlurmCtl) -> list[SubmittedArray]:
    """Submit every array in order; on any failure (or Ctrl-C) cancel what was submitted."""
    check_binds_allowed(config)
    submitted: list[SubmittedArray] = []
    peer_ids: dict[str, str] = {}
    try:
        for job in array_jobs(config):
            array_id = ctl.sbatch(sbatch_args(config, job, peer_ids), job_script(config, job, peer_ids))
            peer_ids[job.section] = array_id
            submitted.append(SubmittedArray(job.section, job.service, array_id, job.num_tasks,
                                            job_name(config, job), job.clean_exit))  # fmt: skip
            logger.info("submitted {}: array job {} ({} task(s){})", job.service, array_id, job.num_tasks,
                        f", after {', '.join(sorted(job.peers()))}" if job.peers() else "")  # fmt: skip
    except BaseException:
        ctl.cancel(a.array_job_id for a in submitted)
        raise
    path = config.output_dir / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(a) for a in submitted], indent=1) + "\n")
    return submitted


def read_submitted(output_dir: Path) -> list[SubmittedArray]:
    path = output_dir / JOBS_FILE
    if not path.exists():
        raise UserError(f"no {JOBS_FILE} in {str(output_dir)!r}: --slurm-cancel cancels a run submitted from this "
                        "host with --slurm; give that run's config (@ <output_dir>/configs/rl.toml)")
    return [SubmittedArray(**row) for row in json.loads(path.read_text())]


class LogTail:
    """One task's console output, streamed from its node: printed with a prefix and copied locally."""

    def __init__(self, name: str, ctl: SlurmCtl, job_id: str, path: str, copy_path: Path, out: TextIO,
                 lock: threading.Lock) -> None:  # fmt: skip
        self.name, self.path, self.copy_path, self.out, self.lock = name, path, copy_path, out, lock
        self.errors = tempfile.TemporaryFile()
        self.num_lines = 0
        self.popen = ctl.follow_output(job_id, path, self.errors)
        self.thread = threading.Thread(target=self._pump, name=f"tail-{name}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        with self.copy_path.open("ab") as copy:
            for raw in self.popen.stdout:
                self.num_lines += 1
                copy.write(raw)
                copy.flush()
                with self.lock:
                    self.out.write(f"[{self.name}] {raw.decode(errors='replace')}")
                    self.out.flush()

    def stop(self) -> None:
        """After the task ended SLURM ends the step itself; this bounds the wait and cleans up."""
        self.thread.join(TAIL_JOIN_S)
        if self.popen.poll() is None:
            self.popen.terminate()
        self.popen.wait()
        self.thread.join(TAIL_JOIN_S)
        self.errors.seek(0)
        errors = self.errors.read().decode(errors="replace").strip()
        self.errors.close()
        if errors and self.num_lines == 0:
            logger.warning("could not stream the output of {} ({}): {}", self.name, self.path, errors)
        elif errors:
            logger.debug("srun following {}: {}", self.name, errors)


class RunFollower:
    """Follows the submitted arrays until the run ends, then cancels and waits for every task."""

    def __init__(self, config: RlConfig, ctl: SlurmCtl, arrays: list[SubmittedArray], out: TextIO = sys.stdout):
        self.config, self.ctl, self.arrays, self.out = config, ctl, arrays, out
        self.by_task = {(a.array_job_id, i): a for a in arrays for i in range(a.num_tasks)}
        specs = [ProcessSpec(a.task_name(i), a.service, Path(), clean_exit=a.clean_exit)
                 for a in arrays for i in range(a.num_tasks)]  # fmt: skip
        self.state = RunState(specs)
        self.tasks: dict[str, TaskState] = {}
        self.ended: set[str] = set()
        self.tails: dict[str, LogTail] = {}
        self.lock = threading.Lock()
        self.logs_dir = config.output_dir / "logs"
        self._signals: list[int] = []

    def run(self) -> int:
        return self.follow().exit_code

    def follow(self) -> RunResult:
        """Follow until the run ends; how it ended (exit code 1 at least when some task outlived its cancel)."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with _Wakeup(self._signals) as wakeup:
            try:
                while self.state.phase is Phase.RUNNING:
                    self._handle_signals()
                    self.poll()
                    wakeup.wait(self.config.slurm.poll_interval_s)
            finally:
                cancelled_all = self._stop_all(wakeup)
        result = self.state.result or RunResult(1, "the launcher failed while following the run")
        (logger.info if result.exit_code == 0 else logger.error)("run ended: {}", result.reason)
        if result.failed is not None:
            logger.error("its console (streamed above): {}", self.logs_dir / f"{result.failed}.out")
        if cancelled_all or result.exit_code != 0:
            return result
        return RunResult(1, f"{result.reason}; but some tasks did not end after scancel", result.failed)

    def poll(self) -> None:
        for task in self.ctl.tasks(a.array_job_id for a in self.arrays):
            array = self.by_task.get((task.array_job_id, task.task_id))
            if array is not None:
                self._update(array.task_name(task.task_id), array, task)

    def _update(self, name: str, array: SubmittedArray, task: TaskState) -> None:
        before = self.tasks.get(name)
        self.tasks[name] = task
        if before is None or before.state != task.state:
            where = f" on {task.node}" if task.node else ""
            logger.info("{} (job {}_{}): {}{}", name, task.array_job_id, task.task_id, task.state, where)
        if task.state == "RUNNING" and name not in self.tails and self.config.slurm.stream_logs:
            self._start_tail(name, array, task)
        if task.state == "RUNNING" and array.section == "monitor" and (before is None or before.state != "RUNNING"):
            self._announce_live_view(task)
        if task.terminal and name not in self.ended:
            self.ended.add(name)
            self.state.on_exit(name, self._exit_code(task))

    def _exit_code(self, task: TaskState) -> int:
        code = self.ctl.exit_code(task.job_id)
        if code is None:  # purged already: the state is all we know
            return 0 if task.state == "COMPLETED" else 1
        if code == 0 and task.state != "COMPLETED":  # e.g. TIMEOUT, NODE_FAIL: ended, not by itself
            return 1
        return code

    def _start_tail(self, name: str, array: SubmittedArray, task: TaskState) -> None:
        path = expand_output_pattern(self.config.slurm.output, array.job_name, task.array_job_id, task.task_id,
                                     task.job_id, task.node)  # fmt: skip
        path = str(workdir(self.config) / path)
        self.tails[name] = LogTail(name, self.ctl, task.job_id, path, self.logs_dir / f"{name}.out", self.out,
                                   self.lock)  # fmt: skip
        logger.info("{}: following {}:{}", name, task.node, path)

    def _announce_live_view(self, task: TaskState) -> None:
        endpoint = self.config.bus.endpoints.monitor_view
        host = endpoint.removeprefix("tcp://").rpartition(":")[0]
        if host in ("127.0.0.1", "localhost", "{monitor}"):  # the host the rendezvous fills in
            endpoint = endpoint.replace(host, self.ctl.node_address(task.node), 1)
        logger.info("live view from any host that reaches {}: rlbus tail --monitor {}", task.node, endpoint)

    def _handle_signals(self) -> None:
        while self._signals:
            self.state.on_signal(self._signals.pop(0))

    def _stop_all(self, wakeup: _Wakeup) -> bool:
        """Cancel every array, the monitor last, and wait; False when some task did not end in time."""
        if self.state.result is None:
            self.state.on_signal(signal.SIGTERM)  # an exception ended the follow loop: stop as on SIGTERM
        if self.state.result is not None and self.state.result.exit_code == 0:
            finishers = [a for a in self.arrays if a.clean_exit == "finished"]
            self._wait_ended(finishers, self.config.stop_timeout_s, wakeup)
        others = [a for a in self.arrays if a.section != "monitor"]
        monitor = [a for a in self.arrays if a.section == "monitor"]
        ok = True
        for group in (others, monitor):
            self.ctl.cancel(a.array_job_id for a in group if not self._all_ended(a))
            ok = self._wait_ended(group, self.config.slurm.cancel_timeout_s, wakeup) and ok
        for tail in self.tails.values():
            tail.stop()
        if not ok:
            alive = sorted(name for name, task in self.tasks.items() if not task.terminal)
            logger.error("tasks still not ended {:g}s after scancel: {}", self.config.slurm.cancel_timeout_s, alive)
        return ok

    def _all_ended(self, array: SubmittedArray) -> bool:
        return all(array.task_name(i) in self.ended for i in range(array.num_tasks))

    def _wait_ended(self, arrays: list[SubmittedArray], timeout_s: float, wakeup: _Wakeup) -> bool:
        deadline = time.monotonic() + timeout_s
        while not all(self._all_ended(a) for a in arrays):
            if time.monotonic() >= deadline or self.state.phase is Phase.KILLING:
                return False
            wakeup.wait(min(self.config.slurm.poll_interval_s, max(0.0, deadline - time.monotonic())))
            self._handle_signals()
            self.poll()
        return True


def run_slurm(config: RlConfig, ctl: SlurmCtl | None = None) -> RunResult:
    """Submit, follow until the run ends, cancel everything left; how the run ended."""
    ctl = ctl or SlurmCtl()
    arrays = submit(config, ctl)
    logger.info("cancel from any shell on this host: rlbus rl @ {} --slurm-cancel",
                config.output_dir / "configs" / "rl.toml")  # fmt: skip
    try:
        return RunFollower(config, ctl, arrays).follow()
    except BaseException:
        ctl.cancel(a.array_job_id for a in arrays)
        raise


def write_job_scripts(config: RlConfig) -> int:
    """``--slurm --dry-run``: write each array's job script, its sbatch options as ``#SBATCH``
    lines, to ``<output_dir>/configs/slurm/<service>.sbatch``; submit nothing. The array job ids
    the real submission passes on (``--peer``, ``--dependency``) appear as ``<section-job-id>``."""
    check_binds_allowed(config)
    folder = config.output_dir / "configs" / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    for job in array_jobs(config):
        ids = {section: f"<{section}-job-id>" for section in job.peers()}
        shebang, rest = job_script(config, job, ids).split("\n", 1)
        options = "".join(f"#SBATCH {arg}\n" for arg in sbatch_args(config, job, ids))
        # Private: a script carries the config's secrets and the Curve keys.
        path = write_private(folder / f"{job.service}.sbatch", f"{shebang}\n{options}{rest}")
        sys.stdout.write(f"{path}\n")
    return 0


def cancel_slurm(config: RlConfig, ctl: SlurmCtl | None = None) -> int:
    """``--slurm-cancel``: scancel every array of the run submitted from this host and wait for them."""
    ctl = ctl or SlurmCtl()
    arrays = read_submitted(config.output_dir)
    ids = [a.array_job_id for a in arrays]
    ctl.cancel(ids)
    logger.info("cancelled arrays {}", ", ".join(ids))
    deadline = time.monotonic() + config.slurm.cancel_timeout_s
    while time.monotonic() < deadline:
        alive = [t for t in ctl.tasks(ids) if not t.terminal]
        if not alive:
            return 0
        time.sleep(config.slurm.poll_interval_s)  # the controller has no notification to wait on
    logger.error("still running {:g}s after scancel: {}", config.slurm.cancel_timeout_s, alive)
    return 1
