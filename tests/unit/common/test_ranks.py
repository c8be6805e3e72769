"""A rank group (rlbus.ranks): torchrun's variables per rank, the first failure stops the others, a
SIGTERM to the group reaches every rank once, and a group killed with -9 leaves no rank behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlbus.ranks import rank_environments, rank_log_path, run_ranks

DEADLINE_S = 60.0
# Each rank writes its pid to ready_<RANK>, then waits for a signal; rank 1 fails at once with FAIL_RANK1.
RANK_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
folder, rank = Path(sys.argv[1]), os.environ["RANK"]
print("rank", rank, "of", os.environ["WORLD_SIZE"], "local", os.environ["LOCAL_RANK"], flush=True)
if rank == "1" and os.environ.get("FAIL_RANK1"):
    sys.exit(3)
def on_term(*_):
    (folder / f"term_{rank}").write_text("SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
(folder / f"ready_{rank}").write_text(str(os.getpid()))
if os.environ.get("EXIT_AT_ONCE"):
    sys.exit(0)
signal.pause()
"""


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not status.exists() or status.read_text().split()[2] != "Z"


def test_each_rank_gets_torchruns_variables():
    one, two = rank_environments(2, {"MASTER_PORT": "29500", "KEPT": "x"})
    assert (one["RANK"], one["LOCAL_RANK"], two["RANK"], two["LOCAL_RANK"]) == ("0", "0", "1", "1")
    for env in (one, two):
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["KEPT"]) == ("127.0.0.1", "29500", "x")
    assert int(rank_environments(1, {})[0]["MASTER_PORT"]) > 0  # a free port when none is given


def test_the_second_node_numbers_its_ranks_after_the_first():
    node = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    envs = rank_environments(2, node)
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("2", "0", "4"), ("3", "1", "4")]
    with pytest.raises(ValueError, match="NODE_RANK, MASTER_ADDR and MASTER_PORT must be set"):
        rank_environments(2, {"NNODES": "2", "NODE_RANK": "1"})
    with pytest.raises(ValueError, match="NODE_RANK = 2 is outside 0..1"):
        rank_environments(2, {**node, "NODE_RANK": "2"})


def test_ranks_that_finish_give_0_and_rank_logs(tmp_path):
    env = {**os.environ, "EXIT_AT_ONCE": "1"}
    assert run_ranks([sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], 2, tmp_path, "svc", env) == 0
    assert rank_log_path(tmp_path, "svc", 1).read_text() == "rank 1 of 2 local 1\n"
    assert not rank_log_path(tmp_path, "svc", 0).exists()  # rank 0 writes to the group's console


def test_the_first_failure_stops_the_other_ranks(tmp_path):
    env = {**os.environ, "FAIL_RANK1": "1"}
    # Rank 0 would wait forever: the group returning at all means it stopped rank 0.
    assert run_ranks([sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], 2, tmp_path, "svc", env) == 3


def start_group(tmp_path: Path) -> subprocess.Popen:
    code = ("import sys; from pathlib import Path; from rlbus.ranks import run_ranks; "
            f"sys.exit(run_ranks([sys.executable, '-c', {RANK_SCRIPT!r}, {str(tmp_path)!r}], 2, Path({str(tmp_path)!r}), 'svc'))")  # fmt: skip
    group = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    wait_for(lambda: all((tmp_path / f"ready_{r}").exists() for r in (0, 1)), "both ranks to start")
    return group


def test_sigterm_to_the_group_stops_every_rank_once(tmp_path):
    group = start_group(tmp_path)
    os.killpg(group.pid, signal.SIGTERM)  # as the launcher stops a service: its whole process group
    assert group.wait(DEADLINE_S) == 143
    assert [(tmp_path / f"term_{r}").read_text() for r in (0, 1)] == ["SIGTERM", "SIGTERM"]


def test_a_group_killed_with_sigkill_leaves_no_rank(tmp_path):
    group = start_group(tmp_path)
    pids = [int((tmp_path / f"ready_{r}").read_text()) for r in (0, 1)]
    group.kill()
    group.wait(DEADLINE_S)
    wait_for(lambda: not any(alive(pid) for pid in pids), "the ranks to die with their group")
