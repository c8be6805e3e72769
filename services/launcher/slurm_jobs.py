"""What ``rlbus rl --slurm`` submits: one array job per service, with its options and its script.

Addresses stay in the config, with host placeholders where a peer's node is
not known before it runs: ``{monitor}``, ``{orchestrator}``, ``{trainer}``,
``{inference}`` (replica 0), ``{inference.N}`` (replica N) and ``{self}`` (the
task's own node). Loopback hosts of the default config are turned into the
placeholder of the service that binds them, binding services listen on
``0.0.0.0``, and env-workers get one URL per inference replica. Each task
fills its placeholders in on its node (services/launcher/slurm_task.py), so the
config travels inside the job script and no file is shared.
"""

from __future__ import annotations

import base64
import io
import re
import secrets
import shlex
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from loguru import logger
from pydantic import BaseModel

from rlbus.config.base import REVEAL_SECRETS
from rlbus.errors import UserError
from rlbus.services.launcher.processes import CleanExit
from rlbus.services.run_config import RlConfig

PLACEHOLDER = re.compile(r"\{(monitor|orchestrator|trainer|inference|self)(?:\.(\d+))?\}")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
CONFIG_END = "RLBUS_CONFIG_END"
KEYS_END = "RLBUS_KEYS_END"
SUBMIT_ORDER = ("monitor", "orchestrator", "trainer", "inference", "env_worker")
"""Every array after the arrays it connects to (``CONNECTS_TO``): binding services first."""
CLEAN_EXITS: dict[str, CleanExit] = {"orchestrator": "done", "trainer": "finished"}
CONNECTS_TO: dict[str, set[str]] = {
    "monitor": set(),
    "orchestrator": {"monitor"},
    "trainer": {"monitor", "orchestrator"},
    "inference": {"monitor", "orchestrator", "trainer"},
    "env_worker": {"monitor", "orchestrator", "inference"},
}
"""Whom each service connects to (docs/protocol.md): its peers in the rendezvous. Every config
holds the whole endpoint table; endpoints a service neither binds nor connects to stay as written."""


@dataclass(frozen=True)
class ArrayJob:
    """One service's job array."""

    section: str
    """Config section and placeholder name: ``env_worker``, ``inference``, ..."""
    service: str
    """The ``rlbus`` command its tasks run: ``env-worker``, ``inference``, ..."""
    num_tasks: int
    config_text: str
    """The service's own config (TOML), placeholders not yet filled in."""
    sbatch_args: tuple[str, ...]

    @property
    def placeholder(self) -> str:
        return self.section.replace("_worker", "")  # only env_worker differs, and has none

    @property
    def clean_exit(self) -> CleanExit:
        return CLEAN_EXITS.get(self.section, "failure")

    def peers(self) -> set[str]:
        """Services it connects to whose nodes its config names: what its tasks wait for."""
        names = {match.group(1) for match in PLACEHOLDER.finditer(self.config_text)}
        return names & CONNECTS_TO[self.section]

    def task_name(self, task_id: int) -> str:
        """``monitor``, ``trainer``, ``inference-0``, ``env-worker-1``: as in the local process table
        (``trainer-0``, ``trainer-1``: a trainer on several nodes)."""
        return numbered_task_name(self.section, self.service, self.num_tasks, task_id)


def numbered_task_name(section: str, service: str, num_tasks: int, task_id: int) -> str:
    numbered = section in ("inference", "env_worker") or (section == "trainer" and num_tasks > 1)
    return f"{service}-{task_id}" if numbered else service


def array_jobs(config: RlConfig) -> list[ArrayJob]:
    """The arrays of a run, in submit order (every array after the ones it connects to)."""
    counts = {"inference": config.slurm.num_inference_replicas, "env_worker": config.num_env_workers,
              "trainer": config.slurm.trainer_nodes}  # fmt: skip
    config = with_inference_key(config)
    return [
        ArrayJob(section, getattr(config, section).SERVICE, counts.get(section, 1),
                 tomli_w.dumps(slurm_section(config, section)), tuple(config.slurm.sbatch_args(section)))
        for section in SUBMIT_ORDER
    ]


def slurm_section(config: RlConfig, section: str) -> dict[str, Any]:
    """A service's resolved config with SLURM's addresses: placeholders for loopback hosts."""
    values = _dump(getattr(config, section))
    bus = values["bus"]
    for name, endpoint in bus["endpoints"].items():
        binder = name.split("_")[0]
        if binder == section or binder in CONNECTS_TO[section]:  # the others it never uses: as written
            bus["endpoints"][name] = _replace_loopback(endpoint, binder)
    bus.setdefault("bind_host", "0.0.0.0")
    if key_dir(config) is not None:  # absolute: the jobs' working folder may differ from this one
        bus["curve"]["keys_dir"] = str(key_dir(config))
    if section == "inference" and values["host"] in LOOPBACK_HOSTS:
        values["host"] = "0.0.0.0"
    if section == "env_worker" and "inference_urls" not in config.env_worker.model_fields_set:
        port, scheme = config.inference.port, "http"
        values["inference_urls"] = [f"{scheme}://{{inference.{i}}}:{port + i}/v1"
                                    for i in range(config.slurm.num_inference_replicas)]  # fmt: skip
    return values


def with_inference_key(config: RlConfig) -> RlConfig:
    """``config``, or a copy whose replicas and env-workers share a key made for this run: on the nodes
    the replicas listen on 0.0.0.0, which needs ``inference.api_key`` (or ``allow_insecure_remote``)."""
    inference = config.inference
    if inference.api_key is not None or inference.allow_insecure_remote:
        return config
    config = config.model_copy(deep=True)
    key = secrets.token_urlsafe(32)
    config.inference.__dict__["api_key"] = key  # validated: a key makes any host allowed
    if config.env_worker.api_key is None and "inference_urls" not in config.env_worker.model_fields_set:
        config.env_worker.__dict__["api_key"] = key
    logger.info("inference.api_key is not set: the replicas and env-workers share a key made for this run")
    return config


def _replace_loopback(address: str, binder: str) -> str:
    scheme, sep, rest = address.partition("://")
    host, colon, port = rest.rpartition(":")
    if sep and colon and host in LOOPBACK_HOSTS:
        return f"{scheme}://{{{binder}}}:{port}"
    return address


def _dump(config: BaseModel) -> dict[str, Any]:
    # Secrets travel inside the job script, as the Curve keys do (key_lines); each task moves them
    # into its service's environment before writing the config file (slurm_task.private_values).
    return config.model_dump(mode="json", exclude_none=True, context={REVEAL_SECRETS: True})


def job_name(config: RlConfig, job: ArrayJob) -> str:
    prefix = config.slurm.job_name or f"rlbus-{config.output_dir.resolve().name}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{prefix}-{job.service}")


def sbatch_args(config: RlConfig, job: ArrayJob, peer_ids: Mapping[str, str]) -> list[str]:
    """Everything sbatch gets besides the script; peers' arrays must have started first."""
    args = [f"--job-name={job_name(config, job)}", f"--array=0-{job.num_tasks - 1}", "--ntasks=1",
            f"--output={config.slurm.output}", f"--chdir={workdir(config)}"]  # fmt: skip
    started = sorted(peer_ids[peer] for peer in job.peers())
    if started:
        # Never hold a node (a GPU) while the peers it connects to still queue.
        args.append("--dependency=after:" + ":".join(started))
    return [*args, *job.sbatch_args]


def workdir(config: RlConfig) -> Path:
    return (config.slurm.workdir or Path.cwd()).resolve()


def job_script(config: RlConfig, job: ArrayJob, peer_ids: Mapping[str, str]) -> str:
    """The batch script: setup, keys, then ``exec`` of the task runner with the config as its stdin."""
    if CONFIG_END in job.config_text:
        raise ValueError(f"the {job.section} config contains the line marker {CONFIG_END!r}; remove it")
    python = shlex.quote(config.slurm.python or sys.executable)
    peers = "".join(f" --peer {name}={peer_ids[name]}" for name in sorted(job.peers()))
    timeout = f" --timeout-s {config.slurm.rendezvous_timeout_s:g}"
    lines = [
        "#!/bin/bash",
        f"# rlbus {job.service}, {job.num_tasks} task(s), written by `rlbus rl --slurm`:",
        "# the config travels below and the service replaces this shell (exec), so scancel reaches it.",
        "set -eo pipefail",
        *config.slurm.setup,
        "export PYTHONUNBUFFERED=1",
        *key_lines(config),
        f"exec {python} -m rlbus.services.launcher.slurm_task {job.service}{peers}{timeout} <<'{CONFIG_END}'",
        job.config_text.rstrip("\n"),
        CONFIG_END,
    ]
    return "\n".join(lines) + "\n"


def key_lines(config: RlConfig) -> list[str]:
    """Shell lines unpacking ``bus.curve.keys_dir`` at the same absolute path on the node (none
    without keys): the keys travel inside the job script like the config, readable by its user only."""
    folder = key_dir(config)
    if folder is None:
        return []
    if not folder.is_dir():
        raise UserError(f"bus.curve.keys_dir {str(folder)!r} is not a folder: create keys with "
                        f"`rlbus keys --out {folder}`")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    packed = base64.encodebytes(buffer.getvalue()).decode().rstrip("\n")
    quoted = shlex.quote(str(folder))
    return ["umask 077", f"mkdir -p {quoted}", f"base64 -d <<'{KEYS_END}' | tar -xz -C {quoted}", packed, KEYS_END,
            "umask 022"]  # fmt: skip


def key_dir(config: RlConfig) -> Path | None:
    folder = config.bus.curve.keys_dir
    return None if folder is None else folder.resolve()


def check_binds_allowed(config: RlConfig) -> None:
    """Services bind ``bus.bind_host`` (0.0.0.0 unless set) on the nodes: refuse plain TCP there
    before anything is submitted, as each service would at start."""
    from rlbus.bus import bind_address
    from rlbus.curve import check_bind_allowed

    endpoint = bind_address(config.bus.endpoints.monitor_telemetry, config.bus.bind_host or "0.0.0.0")
    try:
        check_bind_allowed(endpoint, config.bus.curve, "bus")
    except ValueError:
        raise UserError(f"--slurm needs CurveZMQ keys (the bus leaves the node, binding {endpoint}): create them "
                        "with `rlbus keys --out keys` and set bus.curve.keys_dir = \"keys\" (docs/slurm.md), or set "
                        "bus.curve.allow_insecure_remote = true where every host is trusted") from None
