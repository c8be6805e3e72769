"""Free loopback ports for runs that pick their own (tests, benchmarks, chaos runs).

The usual trick, binding port 0 and reading the port back, returns a port from the
kernel's ephemeral range. The kernel hands out the same range to every outgoing
connection and every other port-0 bind on the machine, so between choosing the port
and the service binding it (seconds later, after a model has loaded) another process
can take it. CI saw exactly that: the trainer's weight port was taken while two vLLM
replicas were starting. Ports chosen here lie below the ephemeral range, where only
an explicit bind can take them.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)  # Linux's default, used where the file is missing
LOWEST_PORT = 10000  # below it lie the registered ports other software listens on
MAX_TRIES = 500

_handed_out: set[int] = set()  # this process never hands out one port twice


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (first, last), or Linux's default."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE
    return low, high


def candidate_ports(ephemeral: tuple[int, int]) -> range:
    """Ports outside ``ephemeral``: the larger of the gaps below and above it."""
    low, high = ephemeral
    below = range(LOWEST_PORT, max(LOWEST_PORT, low))
    above = range(max(LOWEST_PORT, high + 1), 65536)
    return below if len(below) >= len(above) else above


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing holds ``port`` on ``host`` (a port in TIME_WAIT counts as held)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_loopback_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, outside the ephemeral range, not handed out before."""
    ephemeral = ephemeral_range()
    candidates = candidate_ports(ephemeral)
    if not candidates:
        raise RuntimeError(f"no ports outside the ephemeral range {ephemeral} to choose from")
    rng = random.SystemRandom()  # independent of any seed a test or run has set
    for _ in range(MAX_TRIES):
        port = rng.choice(candidates)
        if port not in _handed_out and is_free(port, host):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port on {host} in {candidates.start}-{candidates.stop - 1} after {MAX_TRIES} tries")
