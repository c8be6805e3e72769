"""Fixtures shared by the bus tests: a bus with test-sized timeouts, endpoints
over tcp and ipc chosen at runtime, and a way to wait until peers are connected."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from rlbus.bus import Bus, remaining_ms
from rlbus.config.base import BusConfig
from rlbus.ports import free_loopback_port


@pytest.fixture
def bus_config() -> BusConfig:
    # linger 0: a test that fails must not hang on close with undelivered messages.
    return BusConfig(linger_ms=0, handshake_timeout_s=10, request_timeout_s=2, max_frames=64)


@pytest.fixture
def bus(bus_config: BusConfig) -> Iterator[Bus]:
    with Bus(bus_config) as bus:
        yield bus


def free_tcp_port() -> int:
    """A free loopback port no other process takes by chance before a service binds it."""
    return free_loopback_port()


@pytest.fixture(params=["tcp", "ipc"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def endpoint(transport: str) -> Iterator[Callable[..., str]]:
    """``endpoint(name, fixed=False)``: an address to bind; ``fixed`` gives a concrete
    tcp port (for addresses needed before the binding side exists)."""
    # ipc paths must stay under ~100 bytes, so not under pytest's long tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="rlbus-", dir="/tmp"))

    def make(name: str, fixed: bool = False) -> str:
        if transport == "ipc":
            return f"ipc://{folder / name}"
        return f"tcp://127.0.0.1:{free_tcp_port() if fixed else '*'}"

    yield make
    shutil.rmtree(folder, ignore_errors=True)


class HandshakeWatcher:
    """Counts ZMTP handshakes completed on a bound socket (via a zmq monitor socket)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.num_peers = 0

    def wait(self, num_peers: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.num_peers < num_peers:
            if not self.monitor.poll(remaining_ms(deadline)):
                raise TimeoutError(f"{self.num_peers} of {num_peers} peers connected within {timeout_s}s")
            self.num_peers += recv_monitor_message(self.monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)


@pytest.fixture
def watch_handshakes(bus: Bus) -> Iterator[Callable[[zmq.Socket], HandshakeWatcher]]:
    """``watch_handshakes(sock).wait(n)`` returns once ``n`` peers completed their handshake."""
    watchers: list[HandshakeWatcher] = []

    def watch(sock: zmq.Socket) -> HandshakeWatcher:
        watchers.append(HandshakeWatcher(sock))
        return watchers[-1]

    yield watch
    for watcher in watchers:  # before the bus closes: its context waits for every socket
        watcher.close()
