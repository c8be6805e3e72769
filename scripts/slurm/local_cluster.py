#!/usr/bin/env python3
"""A real single-node SLURM on this machine, for trying ``rlbus rl --slurm`` and for its CI test.

    python scripts/slurm/local_cluster.py up [DIR]     # prints: export SLURM_CONF=DIR/slurm.conf
    python scripts/slurm/local_cluster.py down DIR     # stops every daemon it started

Needs root and Debian's ``slurm-wlm`` and ``munge`` (scripts/ci/install_slurm.sh). There is no
systemd here, so ``munged``, ``slurmctld`` and ``slurmd`` are started by hand with every file
(keys, sockets, state, logs, pid files) in DIR. The settings avoid what breaks on a container
without cgroups (see docs/slurm.md): no cgroup plugins, more CPUs advertised than the machine has
(services of one run wait on each other, so they must all run at once), the real memory size,
and finished jobs kept in a text file since there is no accounting database.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("slurmd", "slurmctld", "munged")
"""In stopping order: the node first, the authentication last."""
ADVERTISED_CPUS = 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def real_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512  # leave the OS some room
    raise RuntimeError("no MemTotal in /proc/meminfo")


def slurm_conf(root: Path, node: str) -> str:
    return f"""\
ClusterName=rlbus
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket.2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
KillWait=15
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={ADVERTISED_CPUS} RealMemory={real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start_munge(root: Path) -> None:
    # munged refuses a socket path with a group/other-writable or non-searchable folder on it.
    munge = root / "munge"
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    subprocess.run(
        ["munged", "--force", f"--socket={munge}/munge.socket.2", f"--key-file={key}",
         f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={munge}/munged.seed"],
        check=True,
    )  # fmt: skip


def up(root: Path, timeout_s: float = 60.0) -> Path:
    """Start munged, slurmctld and slurmd with all state in ``root``; the slurm.conf path."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for folder in ("state", "spool"):
        (root / folder).mkdir(exist_ok=True)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    start_munge(root)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
    wait_for_idle_node(env, node, timeout_s, root)
    return conf


def wait_for_idle_node(env: dict[str, str], node: str, timeout_s: float, root: Path) -> None:
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, check=False)
        state = result.stdout.strip()
        if state.startswith("idle"):
            return
        time.sleep(0.5)  # polling a daemon that has no readiness notification
    logs = "\n".join(f"--- {name}.log\n{_tail(root / f'{name}.log')}" for name in DAEMONS)
    raise RuntimeError(f"node {node} not idle within {timeout_s:g}s (sinfo says {state!r})\n{logs}")


def cancel_all_jobs(root: Path, timeout_s: float = 120.0) -> list[str]:
    """Cancel every job of this private cluster and wait for them to end: a job's processes
    (under slurmstepd) would outlive slurmd. The jobs still running at the timeout."""
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    if not (root / "slurmctld.pid").exists():
        return []
    deadline = time.monotonic() + timeout_s
    running: list[str] = []
    while time.monotonic() < deadline:
        result = subprocess.run(["squeue", "-h", "-t", "PD,R,CG,S,CF", "-o", "%i"], env=env,
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        if result.returncode != 0:
            return []  # the controller is not answering: nothing more to ask it
        running = result.stdout.split()
        if not running:
            return []
        subprocess.run(["scancel", *running], env=env, capture_output=True, timeout=60, check=False)
        time.sleep(1.0)  # jobs end asynchronously; the controller cannot be waited on
    return running


def down(root: Path, timeout_s: float = 20.0) -> list[str]:
    """Cancel every job, then stop every daemon with a pid file in ``root``; the ones that had to be killed."""
    left = cancel_all_jobs(root)
    if left:
        sys.stderr.write(f"jobs still running after scancel: {' '.join(left)}\n")
    killed = []
    for name in DAEMONS:
        pid_file = root / f"{name}.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            continue
        if not _signal(pid, signal.SIGTERM):
            continue
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
            killed.append(name)
    return killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ")[-1].startswith("Z"))


def _signal(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False


def _tail(path: Path, num_lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except FileNotFoundError:
        return "(none)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("dir", nargs="?", type=Path, help="state folder (up: a new temp folder by default)")
    args = parser.parse_args()
    missing = [name for name in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(name) is None]
    if missing:
        sys.stderr.write(f"missing {', '.join(missing)}: run scripts/ci/install_slurm.sh\n")
        return 1
    if args.action == "up":
        root = args.dir or Path(tempfile.mkdtemp(prefix="rlbus-slurm-"))
        try:
            conf = up(root)
        except Exception:
            down(root)
            raise
        sys.stdout.write(f"export SLURM_CONF={conf}\n")
        return 0
    if args.dir is None:
        parser.error("down needs the state folder")
    killed = down(args.dir)
    if killed:
        sys.stderr.write(f"killed (did not stop on SIGTERM): {', '.join(killed)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
