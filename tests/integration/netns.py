"""Hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

:class:`NetnsLab` builds ``hosts`` namespaces, each with loopback and one address on a
private /24, plus a switch namespace holding the bridge, so nothing changes in the
machine's own network namespace. Processes started with :meth:`NetnsLab.start` run
in their host's namespace in a process group of their own; :meth:`NetnsLab.close`
kills every group still running and deletes the namespaces (and with them the links),
whatever state a failed test left behind. Needs root (CAP_SYS_ADMIN) and iproute2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


def netns_unavailable() -> str | None:
    """Why namespaces cannot be built here, or None if a probe namespace could be made."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"rlbus-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed (needs root / CAP_SYS_ADMIN): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


@dataclass
class Host:
    name: str
    netns: str
    address: str
    processes: list[subprocess.Popen] = field(default_factory=list)


class NetnsLab:
    """``hosts`` namespaces on the subnet ``10.<subnet>.0/24`` (``.1``, ``.2`` ... in order)."""

    def __init__(self, hosts: list[str], subnet: str) -> None:
        self.tag = f"rlbus{os.getpid() % 100000}"
        self.subnet = subnet
        self.switch = f"{self.tag}-sw"
        self.hosts = {name: Host(name, f"{self.tag}-{name}", f"10.{subnet}.{i}") for i, name in
                      enumerate(hosts, start=1)}  # fmt: skip
        self._made: list[str] = []

    def __enter__(self) -> NetnsLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("link", "set", "lo", "up", netns=name)

    def _build(self) -> None:
        self._add_netns(self.switch)
        _ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        _ip("link", "set", "br0", "up", netns=self.switch)
        for index, host in enumerate(self.hosts.values()):
            self._add_netns(host.netns)
            # Both ends are created inside the host's namespace, then one end moves to the switch.
            outside = f"port{index}"
            _ip("link", "add", "eth0", "type", "veth", "peer", "name", outside, netns=host.netns)
            _ip("link", "set", outside, "netns", self.switch, netns=host.netns)
            _ip("link", "set", outside, "master", "br0", netns=self.switch)
            _ip("link", "set", outside, "up", netns=self.switch)
            _ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=host.netns)
            _ip("link", "set", "eth0", "up", netns=host.netns)
            # Tools that find "their" address by routing towards the internet (vLLM's get_ip) need a route.
            _ip("route", "add", "default", "dev", "eth0", netns=host.netns)

    def start(self, host: str, argv: list[str], cwd: Path, env: dict[str, str],
              output: IO[bytes] | int) -> subprocess.Popen:  # fmt: skip
        """Run ``argv`` on ``host``, in a new session so :meth:`close` can kill all it spawned."""
        process = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].netns, *argv], cwd=cwd, env=env,
                                   stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        self.hosts[host].processes.append(process)
        return process

    def close(self) -> None:
        """Kill every process group started here, then delete every namespace made here."""
        for host in self.hosts.values():
            for process in host.processes:
                _kill_group(process)
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        self._made.clear()


def _kill_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGKILL the process group led by ``process`` and wait until every member is gone:
    children of a finished leader (vLLM's engine) may still run in its group."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break  # the group is empty
        try:
            process.wait(timeout=0.1)  # reaps the leader; the others are reaped by init
        except subprocess.TimeoutExpired:
            pass
