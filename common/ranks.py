"""Start a trainer (``rlbus trainer``, ``rlbus sft``) as N ranks without ``torchrun``.

A command whose config asks for ``num_ranks > 1`` and that was not itself started as a rank
(no ``RANK`` in its environment) becomes the *rank group*: it starts the same command once per
rank with torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), waits for them, and exits with their result. Several nodes
(SLURM: one task per node) give ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in
the group's environment; ranks are then numbered ``NODE_RANK * num_ranks + local rank``.

Why not torchrun: its workers run in sessions of their own, so a launcher that stops a service by
signalling its process group, and kills it after a grace period, would leave the ranks running
when torchrun is killed with SIGKILL. Here the group is one process the launcher supervises like
any other: SIGTERM to it is passed to every rank once, and its death (even by SIGKILL) kills the
ranks through Linux's parent-death signal. The first rank that fails stops the others, and the
group exits with that rank's code, so a restart (``max_restarts``) restarts every rank together.

Rank 0 writes to the group's own console; rank ``r`` > 0 writes its console (tracebacks, library
warnings) to ``logs/<service>/rank_<r>.log``, where it also logs (:func:`rank_log_path`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from loguru import logger

from rlbus.ports import free_loopback_port

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STOP_GRACE_S = 60.0
"""After a rank failed or the group got SIGTERM, how long the other ranks get to stop before SIGKILL."""
WAIT_SLICE_S = 0.2
_PR_SET_PDEATHSIG = 1


def is_rank(environ: Mapping[str, str]) -> bool:
    """Whether this process is one rank of a group (started by a rank group or by torchrun)."""
    return "RANK" in environ and "WORLD_SIZE" in environ


def rank_log_path(output_dir: Path, service: str, rank: int) -> Path:
    """``<output_dir>/logs/<service>/rank_<rank>.log``: where rank ``rank`` of ``service`` logs."""
    return output_dir / "logs" / service / f"rank_{rank}.log"


def rank_environments(num_ranks: int, environ: Mapping[str, str]) -> list[dict[str, str]]:
    """The environment of each local rank: ``environ`` plus torchrun's variables.

    One node: ``MASTER_ADDR`` 127.0.0.1 and a free port unless ``environ`` names them. Several
    (``NNODES`` > 1): ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` must be given.
    """
    num_nodes = int(environ.get("NNODES", "1"))
    node_rank = int(environ.get("NODE_RANK", "0"))
    if num_nodes > 1 and not all(name in environ for name in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT")):
        raise ValueError(f"NNODES = {num_nodes}: NODE_RANK, MASTER_ADDR and MASTER_PORT must be set too")
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"NODE_RANK = {node_rank} is outside 0..{num_nodes - 1} (NNODES = {num_nodes})")
    master_addr = environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = environ.get("MASTER_PORT") or str(free_loopback_port())
    shared = {"WORLD_SIZE": str(num_nodes * num_ranks), "LOCAL_WORLD_SIZE": str(num_ranks),
              "MASTER_ADDR": master_addr, "MASTER_PORT": master_port, "GROUP_RANK": str(node_rank)}  # fmt: skip
    return [
        {**environ, **shared, "RANK": str(node_rank * num_ranks + local), "LOCAL_RANK": str(local)}
        for local in range(num_ranks)
    ]


def run_ranks(argv: list[str], num_ranks: int, output_dir: Path, service: str,
              environ: Mapping[str, str] | None = None) -> int:  # fmt: skip
    """Run ``argv`` as ``num_ranks`` local ranks until all end; 0, or the first failed rank's code."""
    environments = rank_environments(num_ranks, os.environ if environ is None else environ)
    ranks: list[subprocess.Popen] = []
    requests: list[str] = []  # the handler only records: logging there could deadlock on loguru's lock

    def record(signum: int, _frame: object) -> None:
        requests.append(f"the rank group got {signal.Signals(signum).name}")

    previous = {signum: signal.signal(signum, record) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for env in environments:
            ranks.append(_start_rank(argv, env, output_dir, service))
        logger.info("{} ranks of {} started (pids {}; world size {}, master {}:{})", num_ranks, service,
                    [p.pid for p in ranks], environments[0]["WORLD_SIZE"], environments[0]["MASTER_ADDR"],
                    environments[0]["MASTER_PORT"])  # fmt: skip
        return _wait_ranks(ranks, requests, [int(env["RANK"]) for env in environments])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for rank in ranks:  # an exception above: no rank outlives the group
            if rank.poll() is None:
                rank.kill()
                rank.wait()


def _start_rank(argv: list[str], env: dict[str, str], output_dir: Path, service: str) -> subprocess.Popen:
    """Rank 0 on the group's console, the others into their log file. Each in a session of its own,
    so a signal to the group's process group reaches the group once, and it passes it on once."""
    rank = int(env["RANK"])
    output: IO[bytes] | None = None
    if rank > 0:
        path = rank_log_path(output_dir, service, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        output = path.open("ab")
    try:
        # The hook only calls prctl and getppid: nothing that could wait on a lock of another thread.
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                stderr=subprocess.STDOUT if output else None, start_new_session=True,
                                preexec_fn=parent_death_signal(signal.SIGKILL))  # noqa: PLW1509  # fmt: skip
    finally:
        if output is not None:
            output.close()  # the rank holds its own copy


def _wait_ranks(ranks: list[subprocess.Popen], requests: list[str], numbers: list[int]) -> int:
    """Wait for every rank; the first failure (or a SIGTERM recorded in ``requests``) stops the rest.
    A rank killed by a signal counts as exit code 128 + it."""
    result = 0
    stopping: list[str] = []
    deadline: float | None = None
    while any(rank.poll() is None for rank in ranks):
        if requests:
            _stop(ranks, stopping, requests[0])
        if stopping and deadline is None:
            deadline = time.monotonic() + STOP_GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            logger.warning("ranks still running {:g}s after SIGTERM: killing them", STOP_GRACE_S)
            for rank in ranks:
                rank.kill()
        for rank, number in zip(ranks, numbers, strict=True):
            code = _wait_one(rank)
            if code not in (None, 0) and result == 0:
                result = code if code > 0 else 128 - code
                _stop(ranks, stopping, f"rank {number} exited with code {code}")
    return result


def _wait_one(rank: subprocess.Popen) -> int | None:
    try:
        return rank.wait(WAIT_SLICE_S)
    except subprocess.TimeoutExpired:
        return None


def _stop(ranks: list[subprocess.Popen], stopping: list[str], why: str) -> None:
    """SIGTERM every running rank, once per group."""
    if stopping:
        return
    stopping.append(why)
    logger.warning("{}: stopping the other ranks", why)
    for rank in ranks:
        if rank.poll() is None:
            rank.send_signal(signal.SIGTERM)


def parent_death_signal(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to send ``signum`` to the child when its parent dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    parent = os.getpid()

    def set_pdeathsig() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signum)

    return set_pdeathsig
