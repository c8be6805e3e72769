"""A real verifiers v1 env server (``verifiers.v1.serve.serve_env``, the package's own server) in a
subprocess, for the tests that drive one from rlbus."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlbus.environments import EnvironmentUnavailable

# verifiers 0.4 ships no command for it: this is how a process hosts one env (max_workers=1: no pool).
SERVE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
import verifiers.v1 as vf
from verifiers.v1.serve import serve_env
serve_env(max_workers=1, address=sys.argv[1], config=vf.resolve_env_config(json.loads(sys.argv[2])))
"""


def served_env_config(taskset: dict, seat: str) -> dict:
    """An env config whose ``seat`` plays with verifiers' ``null`` harness as a local subprocess."""
    return {"taskset": taskset, seat: {"harness": {"id": "null"}, "runtime": {"type": "subprocess"}}}


@dataclass
class RunningServer:
    address: str
    process: subprocess.Popen


@contextmanager
def env_server(address: str, config: dict, log: Path, env: dict[str, str] | None = None,
               cwd: Path | None = None, start_timeout_s: float = 120.0) -> Iterator[RunningServer]:  # fmt: skip
    """A server for ``config`` bound at ``address``, answering health when entered; stopped on exit."""
    from rlbus.services.env_worker.verifiers_serve import check_server

    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-c", SERVE, address, json.dumps(config)], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=cwd)  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the env server exited with {process.returncode}: {log.read_text()[-3000:]}")
            try:
                check_server(address, 5.0)  # a request waits in the socket until the server binds
                break
            except EnvironmentUnavailable:
                if time.monotonic() > deadline:
                    raise
        yield RunningServer(address, process)
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
