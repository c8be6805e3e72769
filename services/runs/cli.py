"""``rlbus run | list | logs | stop | delete``: runs on this machine, by id.

``rlbus run`` checks the config in this process (exit 2 on a mistake, before anything is
detached), records the run under ``$RLBUS_HOME/runs`` and starts ``rlbus rl`` with the same
arguments in a session of its own, its output in ``<output_dir>/logs/console.out``. With
``--slurm`` that ``rlbus rl`` submits the job arrays and follows them; the registry records their
ids, and stop, list and delete reach the jobs through SLURM (:mod:`.slurm`). Each command answers
with one exit code: 0 done, 1 failed, 2 a usage mistake (unknown id, a run that is not running).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rlbus.config import ConfigError, load_config
from rlbus.services.launcher.main import ALIASES
from rlbus.services.launcher.platform import check_platform_key
from rlbus.services.launcher.slurm_ctl import SlurmCtl
from rlbus.services.launcher.slurm_jobs import check_binds_allowed
from rlbus.services.run_config import RUN_MARKER, RlConfig, check_cleanable, mark_run_folder, service_env
from rlbus.services.run_config.checks import check_config
from rlbus.services.run_config.short import rewrite_flags
from rlbus.services.runs import logs, process, slurm
from rlbus.services.runs.registry import ACTIVE, Registry, RunRecord, UnknownRun, rlbus_home
from rlbus.services.runs.state import state_of, wait_ended
from rlbus.services.runs.table import list_rows, print_table

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
RL_COMMAND = [sys.executable, "-m", "rlbus", "rl"]
"""What the detached wrapper runs, before the user's arguments (tests put a cheap command here)."""
WRAPPER = [sys.executable, "-m", "rlbus.services.runs.wrapper"]
FOLLOW_POLL_S = 0.5
RUN_HELP = """usage: rlbus run @ config.toml [--key value ...]

Start a whole run (what 'rlbus rl' starts) in the background and return at once: prints the
run's id, its folder and how to follow it. The config is checked first (exit 2 on a mistake,
nothing started). Every option of 'rlbus rl --help' applies. Then:
  rlbus list                 every run: status, step, reward
  rlbus logs -f ID           follow its console (--service NAME: one service's log)
  rlbus stop ID              stop it gracefully (again: kill it); with --slurm: scancel its jobs
  rlbus delete ID            forget it and delete its run folder
"""


def run_main(argv: Sequence[str]) -> int:
    args = list(argv)
    if "-h" in args or "--help" in args:
        sys.stdout.write(RUN_HELP)
        return EXIT_OK
    refused = [flag for flag in ("--dry-run", "--slurm-cancel") if flag in args]
    if refused:
        return _usage_error("run", f"{refused[0]} does not start a run: use 'rlbus rl {' '.join(args)}'")
    try:
        config = checked_config(args)
    except (ConfigError, ValueError) as exc:
        return _usage_error("run", str(exc))
    registry = Registry(rlbus_home())
    busy = [r.id for r in registry.records() if r.output_dir == str(config.output_dir.resolve()) and _active(r)]
    if busy:
        return _usage_error(
            "run",
            f"output_dir {str(config.output_dir)!r} belongs to run {busy[0]}, which is "
            f"still running: stop it ('rlbus stop {busy[0]}') or pick another --output-dir",
        )
    record = start_run(registry, config, args)
    say_started(record)
    return EXIT_OK


def checked_config(args: list[str]) -> RlConfig:
    """The run's config, checked as ``rlbus rl`` checks it (and its Prime API key when it streams to the
    platform); a ConfigError (or ValueError) if it is wrong."""
    config = load_config(RlConfig, rewrite_flags(args, ALIASES), env=service_env(None, os.environ))
    check_config(config)
    check_platform_key(config, os.environ)  # registering is the launcher's, but a missing key stops us here
    if config.clean_output_dir:
        check_cleanable(config.output_dir)
    if config.slurm.enabled:
        check_binds_allowed(config)
        if shutil.which("sbatch") is None:
            raise ValueError("--slurm: sbatch is not on PATH: submit from a SLURM login node (slurm-client installed)")
    return config


def start_run(registry: Registry, config: RlConfig, args: list[str]) -> RunRecord:
    """Record the run, prepare its folder and start it detached."""
    output_dir = config.output_dir.resolve()
    if config.clean_output_dir:
        # Cleaned here, not by the launcher: it would delete the console file the run writes to.
        shutil.rmtree(output_dir, ignore_errors=True)
        args = [*args, "--no-clean-output-dir"]
    mark_run_folder(output_dir)
    record = new_record(registry.new_id(), config, args)
    registry.save(record)
    argv = [*WRAPPER, str(registry.folder.parent), record.id, "--", *RL_COMMAND, *args]
    child = process.spawn_detached(argv, Path(record.console), Path(record.cwd), os.environ)
    stat = process.proc_stat(child.pid)
    return registry.update(record.id, pid=child.pid, pid_start=stat.start_ticks if stat else None,
                           boot_id=process.boot_id())  # fmt: skip


def new_record(run_id: str, config: RlConfig, args: list[str]) -> RunRecord:
    output_dir = config.output_dir.resolve()
    return RunRecord(
        id=run_id, name=config.monitor.wandb.name or output_dir.name, model=config.model,
        output_dir=str(output_dir), console=str(output_dir / "logs" / "console.out"), argv=args,
        cwd=os.getcwd(), host=socket.gethostname(), started=time.time(),
        envs=[env.id for env in config.orchestrator.train.env], max_steps=config.max_steps,
        slurm=config.slurm.enabled,
    )  # fmt: skip


def say_started(record: RunRecord) -> None:
    how = f"SLURM job arrays, followed by pid {record.pid}" if record.slurm else f"pid {record.pid}"
    sys.stdout.write(
        f"started run {record.id} ({record.name}: {record.model}, {how})\n"
        f"  run folder: {record.output_dir}\n  console:    {record.console}\n"
        f"  follow it:  rlbus logs -f {record.id}\n  all runs:   rlbus list\n  stop it:    rlbus stop {record.id}\n"
    )  # fmt: skip


def list_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlbus list", description="Every run on this machine, oldest first.")
    parser.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    args = parser.parse_args(list(argv))
    registry = Registry(rlbus_home())
    records = [slurm.record_jobs(registry, record) for record in registry.records()]
    rows = list_rows(records, state_of, time.time())
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    elif not rows:
        sys.stdout.write("no runs yet: start one with 'rlbus run @ config.toml'\n")
    else:
        print_table(rows, sys.stdout)
    return EXIT_OK


def logs_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlbus logs", description="A run's console output, or one service's logs.")
    parser.add_argument("id", help="run id (or its start)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the run ends")
    parser.add_argument("--service", help="that service's logs instead: rl, monitor, inference, trainer, env-worker "
                        "(every env-worker), env-worker-1 (one process), ...; several files each under a header")  # fmt: skip
    parser.add_argument("-n", "--lines", type=int, help="only the last N lines (of each file)")
    args = parser.parse_args(list(argv))
    registry = Registry(rlbus_home())
    record = _record_or_error(registry, "logs", args.id)
    if isinstance(record, int):
        return record
    logs_dir = Path(record.output_dir) / "logs"

    def paths() -> list[Path]:  # asked again while following: a service's files may appear late
        return logs.service_logs(logs_dir, args.service) if args.service else [Path(record.console)]

    if args.service and not paths() and not (args.follow and _active(record)):
        return _no_service_logs(record, logs_dir, args.service)
    printer = logs.Printer(sys.stdout)
    printer.print_start(paths(), args.lines)
    if args.follow:
        logs.follow(printer, paths, lambda: _alive_now(registry, record.id), FOLLOW_POLL_S)
    return EXIT_OK


def _alive_now(registry: Registry, run_id: str) -> bool:
    try:
        return state_of(slurm.record_jobs(registry, registry.load(run_id))).alive
    except UnknownRun:  # deleted meanwhile
        return False


def _no_service_logs(record: RunRecord, logs_dir: Path, service: str) -> int:
    known = logs.known_services(logs_dir)
    close = difflib.get_close_matches(logs.service_name(service), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return _usage_error("logs", f"run {record.id} has no log of service {service!r} in {logs_dir}"
                                f" ({hint}there are: {', '.join(known) or 'none yet'})")  # fmt: skip


def stop_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlbus stop", description="Stop a run: SIGTERM to all of it (a SLURM run: "
                                     "scancel of its jobs); a second stop (or --force) kills it with SIGKILL.")  # fmt: skip
    parser.add_argument("id", help="run id (or its start)")
    parser.add_argument("--force", action="store_true", help="kill at once (SIGKILL)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a graceful stop (60)")
    args = parser.parse_args(list(argv))
    registry = Registry(rlbus_home())
    record = _record_or_error(registry, "stop", args.id)
    if isinstance(record, int):
        return record
    status = state_of(record).status
    if status not in ACTIVE:
        return _usage_error("stop", f"run {record.id} is not running ({status})")
    record = registry.update(record.id, stop_requested=record.stop_requested or time.time())
    if args.force or status != "running":
        kill(record)
        wait_ended(registry, record.id, 10.0)
        what = "processes and SLURM jobs" if record.slurm else "processes"
        sys.stdout.write(f"run {record.id} killed (SIGKILL to all its {what})\n")
        return EXIT_OK
    terminate(record)
    sys.stdout.write(f"stopping run {record.id} ({'scancel' if record.slurm else 'SIGTERM'}); waiting up to "
                     f"{args.timeout:g}s ...\n")  # fmt: skip
    sys.stdout.flush()
    if wait_ended(registry, record.id, args.timeout):
        sys.stdout.write(f"run {record.id} stopped\n")
        return EXIT_OK
    sys.stdout.write(f"run {record.id} is still stopping; 'rlbus stop {record.id}' again kills it\n")
    return EXIT_FAILED


def terminate(record: RunRecord) -> None:
    """A graceful stop. A SLURM run's wrapper cancels its jobs itself (the monitor last); without it, scancel."""
    if process.is_alive(record) or not record.slurm:
        process.terminate(record)
    else:
        slurm.cancel(record, SlurmCtl(), force=False)


def kill(record: RunRecord) -> None:
    """SIGKILL to the run's processes, and to its SLURM jobs' services."""
    process.kill(record)
    if record.slurm:
        slurm.cancel(record, SlurmCtl(), force=True)


def delete_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlbus delete", description="Forget a run and delete its run folder.")
    parser.add_argument("id", help="run id (or its start)")
    parser.add_argument("--force", action="store_true", help="kill the run first if it is still running")
    args = parser.parse_args(list(argv))
    registry = Registry(rlbus_home())
    record = _record_or_error(registry, "delete", args.id)
    if isinstance(record, int):
        return record
    if _active(record):
        if not args.force:
            return _usage_error("delete", f"run {record.id} is still running: stop it first ('rlbus stop "
                                          f"{record.id}') or pass --force to kill it")  # fmt: skip
        kill(registry.update(record.id, stop_requested=record.stop_requested or time.time()))
        wait_ended(registry, record.id, 10.0)
    sys.stdout.write(delete_folder(registry, record) + "\n")
    registry.remove(record.id)
    sys.stdout.write(f"deleted run {record.id}\n")
    return EXIT_OK


def delete_folder(registry: Registry, record: RunRecord) -> str:
    """Delete the run's folder when rlbus made it and no other live run uses it; what was done."""
    folder = Path(record.output_dir)
    users = [r.id for r in registry.records() if r.id != record.id and r.output_dir == record.output_dir]
    if not folder.exists():
        return f"run folder {folder} is gone already"
    if any(_active(registry.load(run_id)) for run_id in users):
        return f"kept {folder}: a running run uses it too"
    if not (folder / RUN_MARKER).is_file():
        return f"kept {folder}: it holds no {RUN_MARKER} marker, so rlbus did not make it"
    shutil.rmtree(folder)
    return f"removed {folder}"


def _active(record: RunRecord) -> bool:
    return state_of(record).status in ACTIVE


def _record_or_error(registry: Registry, command: str, run_id: str) -> RunRecord | int:
    """The run ``run_id`` names (or starts), or the exit code of a usage error saying why not."""
    try:
        return slurm.record_jobs(registry, registry.load(run_id))
    except UnknownRun as exc:
        return _usage_error(command, str(exc))


def _usage_error(command: str, message: str) -> int:
    sys.stderr.write(f"rlbus {command}: {message}\n")
    return EXIT_USAGE
