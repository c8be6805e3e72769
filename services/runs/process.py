"""The processes of a detached run: start one, tell whether it lives, stop it.

A run is one process group: the wrapper (:mod:`.wrapper`, its leader, in a session of its own)
and ``rlbus rl`` under it. ``rlbus rl`` starts each service in a process group of its own and
stops them all on SIGTERM, so a graceful stop is SIGTERM to the run's group; a forced one is
SIGKILL to that group and to every group its descendants lead.

Liveness reads ``/proc/<pid>/stat``: a zombie is dead, and so is a live process whose start
time differs from the recorded one (the pid was reused, e.g. after a reboot).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from rlbus.services.runs.registry import RunRecord

PROC = Path("/proc")
POLL_S = 0.2


class ProcStat(NamedTuple):
    state: str
    """R, S, D, Z (zombie), X (dead), ..."""
    ppid: int
    pgid: int
    start_ticks: int
    """Start time in clock ticks after boot."""


def proc_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` of a process, None when there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return ProcStat(fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def boot_id() -> str | None:
    """This boot's id (Linux), to tell a pid recorded before a reboot."""
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return None


def is_alive(record: RunRecord) -> bool:
    """Whether the run's wrapper process is still the one that was started and not a zombie."""
    if record.pid is None:
        return False
    if record.boot_id is not None and boot_id() not in (None, record.boot_id):
        return False
    if not PROC.is_dir():  # no /proc (macOS): the pid is all there is
        return _pid_exists(record.pid)
    stat = proc_stat(record.pid)
    if stat is None or stat.state in ("Z", "X"):
        return False
    return record.pid_start is None or stat.start_ticks == record.pid_start


def spawn_detached(argv: Sequence[str], console: Path, cwd: Path, env: Mapping[str, str]) -> subprocess.Popen:
    """Start ``argv`` in a new session, stdin closed, stdout and stderr appended to ``console``."""
    console.parent.mkdir(parents=True, exist_ok=True)
    with console.open("ab") as output:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, cwd=cwd,
            env={**env, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )  # fmt: skip


def terminate(record: RunRecord) -> None:
    """SIGTERM to the run's process group: ``rlbus rl`` stops every service and exits."""
    if is_alive(record):  # never signal a group whose leader's pid was reused
        _signal_group(record.pid, signal.SIGTERM)


def kill(record: RunRecord) -> None:
    """SIGKILL to the run's process group and to every group a descendant of it leads."""
    if record.pid is None or not is_alive(record):
        return
    groups = {record.pid}
    for pid in descendants(record.pid):
        stat = proc_stat(pid)
        if stat is not None:
            groups.add(stat.pgid)
    for pgid in groups:
        _signal_group(pgid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in PROC.glob("[0-9]*"):
        stat = proc_stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat.ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def wait_dead(record: RunRecord, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the run's wrapper to end; True when it did."""
    deadline = time.monotonic() + timeout_s
    while is_alive(record):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def _signal_group(pgid: int | None, signum: int) -> None:
    if pgid is None:
        return
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
