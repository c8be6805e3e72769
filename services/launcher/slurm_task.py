"""One task of an ``rlbus rl --slurm`` array, on its node: rendezvous, then ``exec`` the service.

    python -m rlbus.services.launcher.slurm_task <service> [--peer SECTION=ARRAY_JOB_ID ...] < config.toml

The config (TOML, from the job script) names peers' hosts by placeholder
(services/launcher/slurm_jobs.py). Each one is filled in with the address of
the node running that peer's task, asked of the SLURM controller and keyed on
the peer's array job id; ``{self}`` is this task's node. The filled-in config
is written under ``<output_dir>/configs/slurm/`` on this node, and this
process becomes the service (``os.execv``): it never daemonizes, so
``scancel`` signals the service itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tomli_w
from loguru import logger

from rlbus.config.base import redact_values, secret_paths, write_private
from rlbus.config.loader import ENV_PREFIX
from rlbus.services.launcher.slurm_ctl import SlurmCtl, TaskState
from rlbus.services.launcher.slurm_jobs import PLACEHOLDER
from rlbus.services.run_config import SECTIONS

DEFAULT_MASTER_PORT = "29500"
"""Where a trainer's nodes meet (torchrun's default), unless ``MASTER_PORT`` is set (``slurm.setup``)."""
WAIT_POLL_S = 2.0
"""How often a task asks the controller whether a peer runs yet (it cannot be notified)."""

AddressOf = Callable[[str, int], "str | None"]
"""(section, task id) -> the address of the node running that task (``self``: this task), or None
to leave the placeholder as written (a service this one never connects to)."""


class RendezvousError(RuntimeError):
    """A peer never ran, or ended, before this task could find it."""


def fill_placeholders(text: str, address_of: AddressOf) -> str:
    """``text`` with every host placeholder replaced; each distinct one is looked up once."""
    found: dict[str, str] = {}
    for match in PLACEHOLDER.finditer(text):
        if match.group(0) not in found:
            address = address_of(match.group(1), int(match.group(2) or 0))
            found[match.group(0)] = match.group(0) if address is None else address
    return PLACEHOLDER.sub(lambda m: found[m.group(0)], text)


def task_args(service: str, values: Mapping[str, Any], task_id: int, own_address: Callable[[], str]) -> list[str]:
    """Flags that make this array task a distinct replica of its service."""
    if service == "env-worker":
        return ["--worker-id", f"env-worker-{task_id}"]
    if service != "inference":
        return []
    port = int(values.get("port", 8000)) + task_id
    args = ["--port", str(port)]
    if "replica_id" not in values:
        args += ["--replica-id", f"inference-{task_id}"]
    if "advertise_url" not in values:
        args += ["--advertise-url", f"http://{own_address()}:{port}/v1"]
    return args


class PeerFinder:
    """Finds the node of a peer's task through the controller, waiting while it is pending."""

    def __init__(self, ctl: SlurmCtl, service: str, peers: Mapping[str, str], timeout_s: float) -> None:
        self.ctl, self.service, self.peers = ctl, service, dict(peers)
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def address_of(self, section: str, task_id: int) -> str | None:
        if section == "self" or section == self.service:  # a binding service's own endpoints
            return self.own_address()
        if section not in self.peers:
            return None
        return self.task_address(section, self.peers[section], task_id)

    def task_address(self, section: str, array_id: str, task_id: int) -> str:
        """The address of the node running task ``task_id`` of ``array_id``, once it runs."""
        node = self._wait_running(section, array_id, task_id)
        address = self.ctl.node_address(node)
        logger.info("{} task {} runs on {} ({})", section, task_id, node, address)
        return address

    def own_address(self) -> str:
        node = os.environ.get("SLURMD_NODENAME")
        if not node:
            raise RendezvousError("SLURMD_NODENAME is not set: slurm_task runs inside a SLURM job only")
        return self.ctl.node_address(node)

    def _wait_running(self, section: str, array_id: str, task_id: int) -> str:
        last = "unknown to the controller"
        while time.monotonic() < self.deadline:
            task = self._find(array_id, task_id)
            if task is not None and task.state == "RUNNING" and task.node:
                return task.node
            if task is not None and task.terminal:
                raise RendezvousError(f"{section} task {array_id}_{task_id} ended ({task.state}) before it was found")
            last = task.state if task else last
            time.sleep(WAIT_POLL_S)
        raise RendezvousError(
            f"{section} task {array_id}_{task_id} was not running within {self.timeout_s:g}s (last state: {last})"
        )

    def _find(self, array_id: str, task_id: int) -> TaskState | None:
        return next((t for t in self.ctl.tasks([array_id]) if t.task_id == task_id), None)


def trainer_node_env(service: str, task_id: int, environ: Mapping[str, str], finder: PeerFinder) -> dict[str, str]:
    """A trainer array of several tasks, one per node: where the nodes' ranks meet (``rlbus.ranks``
    reads these), task 0's node on ``MASTER_PORT``. Nothing for one task or another service."""
    num_nodes = int(environ.get("SLURM_ARRAY_TASK_COUNT") or int(environ.get("SLURM_ARRAY_TASK_MAX", "0")) + 1)
    if service != "trainer" or num_nodes <= 1:
        return {}
    master = finder.own_address() if task_id == 0 else finder.task_address("trainer", environ["SLURM_ARRAY_JOB_ID"], 0)
    return {"NNODES": str(num_nodes), "NODE_RANK": str(task_id), "MASTER_ADDR": master,
            "MASTER_PORT": environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)}


def private_values(values: Mapping[str, Any], service: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``values`` with their secrets redacted, and the secrets as the ``RLBUS_<SECTION>__<KEY>``
    variables the service reads them from: config files on the node never hold them."""
    section = service.replace("-", "_")
    paths = [p for p in secret_paths(SECTIONS[section]) if _value_at(values, p) is not None]
    env = {ENV_PREFIX + "__".join((section, *path)).upper(): str(_value_at(values, path)) for path in paths}
    return redact_values(values, paths), env


def _value_at(values: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        values = values.get(part) if isinstance(values, Mapping) else None
    return values


def write_config(values: Mapping[str, Any], service: str, task_id: int) -> Path:
    path = Path(values.get("output_dir", "outputs")) / "configs" / "slurm" / f"{service}-{task_id}.toml"
    return write_private(path, tomli_w.dumps(dict(values)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlbus.services.launcher.slurm_task", description=__doc__)
    parser.add_argument("service", help="the rlbus command to run: monitor, trainer, env-worker, ...")
    parser.add_argument("--peer", action="append", default=[], metavar="SECTION=ARRAY_JOB_ID",
                        help="array job id of a service whose placeholder the config uses")  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=900.0, help="how long to wait for peers to run")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    peers = dict(peer.split("=", 1) for peer in args.peer)
    text = sys.stdin.read()
    task_id = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    finder = PeerFinder(SlurmCtl(), args.service, peers, args.timeout_s)
    logger.info("{} task {} (job {}): finding peers {}", args.service, task_id, os.environ.get("SLURM_JOB_ID"),
                sorted(peers) or "none")  # fmt: skip
    values, secret_env = private_values(tomllib.loads(fill_placeholders(text, finder.address_of)), args.service)
    os.environ.update(secret_env)  # execv hands this environment to the service
    os.environ.update(trainer_node_env(args.service, task_id, os.environ, finder))
    path = write_config(values, args.service, task_id)
    argv_service = [sys.executable, "-m", "rlbus", args.service, "@", str(path),
                    *task_args(args.service, values, task_id, finder.own_address)]  # fmt: skip
    logger.info("exec {}", " ".join(argv_service))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv_service)
    return 1  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
