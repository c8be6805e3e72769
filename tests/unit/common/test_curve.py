"""CurveZMQ on real sockets: keys, the ZAP allow list, refused peers, the loopback rule, ``rlbus keys``."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.utils.monitor
from loguru import logger

from rlbus.abus import AsyncBus
from rlbus.bus import Bus, BusError
from rlbus.config.base import BusConfig, CurveConfig
from rlbus.curve import check_bind_allowed, create_keys, is_loopback
from rlbus.messages import Ack, Hello, TaskRequest
from rlbus.pubsub import Publisher, Subscriber, TelemetryClient
from rlbus.services.cli import main as rlbus
from tests.curve_keys import Refusals, make_key_sets

TIMEOUT_S = 30.0  # generous for a loaded machine; a refused peer never gets through however long we wait


@pytest.fixture
def refusals() -> Iterator[Refusals]:
    watcher = Refusals()
    yield watcher
    watcher.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_key_sets(tmp_path_factory.mktemp("keys"))


def curve(keys_dir: Path | None, client: str = "client", **overrides) -> BusConfig:
    values = {"linger_ms": 0, "request_timeout_s": TIMEOUT_S, "handshake_timeout_s": TIMEOUT_S}
    return BusConfig(curve=CurveConfig(keys_dir=keys_dir, client_name=client), **(values | overrides))


def test_rlbus_keys_writes_the_documented_layout_with_private_secrets(tmp_path, capsys):
    assert rlbus(["keys", "--out", str(tmp_path / "k"), "--clients", "trainer,laptop"]) == 0
    files = sorted(str(p.relative_to(tmp_path / "k")) for p in (tmp_path / "k").rglob("*.key*"))
    assert files == ["clients/laptop.key", "clients/laptop.key_secret", "clients/trainer.key",
                     "clients/trainer.key_secret", "server.key", "server.key_secret"]  # fmt: skip
    for secret in (tmp_path / "k").rglob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert "server.key_secret" in capsys.readouterr().out
    # Never overwritten: a new server key would lock every host out.
    assert rlbus(["keys", "--out", str(tmp_path / "k")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_secret_key_files_are_never_readable_by_others_even_while_written(tmp_path, monkeypatch):
    seen = []  # (file mode, folder mode) of each secret file the moment it exists
    original = zmq.auth.create_certificates

    def watched(folder, name):
        public, secret = original(folder, name)
        seen.append((stat.S_IMODE(os.stat(secret).st_mode), stat.S_IMODE(os.stat(folder).st_mode)))
        return public, secret

    monkeypatch.setattr(zmq.auth, "create_certificates", watched)
    old_umask = os.umask(0o022)  # the usual umask: files 0644 unless made otherwise
    try:
        written = create_keys(tmp_path / "k", ["a", "b"])
    finally:
        os.umask(old_umask)
    assert len(seen) == 3
    assert all(file_mode & 0o077 == 0 or folder_mode & 0o077 == 0 for file_mode, folder_mode in seen), seen
    secrets = [path for path in written if path.name.endswith(".key_secret")]
    assert len(secrets) == 3 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["clients", "server.key", "server.key_secret"]


def test_keys_from_rlbus_keys_carry_a_request_and_its_reply(tmp_path):
    assert rlbus(["keys", "--out", str(tmp_path / "k"), "--clients", "laptop"]) == 0
    config = curve(tmp_path / "k", "laptop")
    with Bus(config) as server, Bus(config) as client:
        router = server.bind(zmq.ROUTER, "tcp://127.0.0.1:*", "tasks")
        dealer = client.connect(zmq.DEALER, router.address, "tasks")
        client.send(dealer, TaskRequest(worker_id="w", num_tasks=1))
        identity, request = server.recv(router, TIMEOUT_S)
        assert request == TaskRequest(worker_id="w", num_tasks=1)
        server.send(router, Ack(ref="r"), identity)
        assert client.recv(dealer, TIMEOUT_S) == Ack(ref="r")
        assert router.curve_server and not dealer.curve_server


@pytest.mark.parametrize("peer", ["plain", "intruder", "impostor"])
def test_only_an_admitted_client_key_delivers(keys, refusals, peer):
    peer_keys = {"plain": None, "intruder": keys["intruder"], "impostor": keys["impostor"]}[peer]
    with Bus(curve(keys["good"], "trainer")) as server, Bus(curve(keys["good"], "trainer")) as friend, \
            Bus(curve(peer_keys)) as stranger:  # fmt: skip
        pull = server.bind(zmq.PULL, "tcp://127.0.0.1:*", "batches")
        push = stranger.connect(zmq.PUSH, pull.address)
        stranger.send(push, Hello(sender="stranger", nonce=1))
        lines = refusals.wait(1)
        # Which side notices first decides between the precise reason and a broken-off handshake.
        expected = {"plain": "does not use Curve", "intruder": "unknown Curve key", "impostor": "did not decrypt"}
        assert expected[peer] in lines[0] or (peer != "intruder" and "broke off" in lines[0]), lines[0]
        assert "batches" in lines[0], lines[0]
        assert server.stats.auth_rejected["batches"] >= 1
        assert server.stats.metrics()["bus/auth_rejected_by_socket/batches"] >= 1
        friend.send(friend.connect(zmq.PUSH, pull.address), Hello(sender="friend", nonce=2))
        assert server.recv(pull, TIMEOUT_S) == Hello(sender="friend", nonce=2)
        # The stranger's message, sent first, never arrives.
        assert server.recv_before(pull, 0, None) is None


def test_publisher_greets_only_admitted_subscribers(keys, refusals):
    with Bus(curve(keys["good"], "trainer")) as server, Bus(curve(keys["good"], "tail")) as friend, \
            Bus(curve(keys["intruder"])) as stranger:  # fmt: skip
        publisher = Publisher(server, "tcp://127.0.0.1:*", "trainer")
        outsider = Subscriber(stranger, publisher.address)
        refusals.wait(1)
        subscriber = Subscriber(friend, publisher.address)
        assert publisher.pump(TIMEOUT_S) == 1  # only the admitted subscriber joined
        subscriber.wait_ready(TIMEOUT_S)
        assert not outsider.sock.poll(0)


def test_telemetry_and_the_async_bus_use_client_keys(keys, refusals):
    async def ask(config: BusConfig, address: str) -> None:
        with AsyncBus(config) as bus:
            dealer = bus.connect(zmq.DEALER, address, "policy")
            await bus.send(dealer, TaskRequest(worker_id="async", num_tasks=1))

    with Bus(curve(keys["good"], "trainer")) as server:
        router = server.bind(zmq.ROUTER, "tcp://127.0.0.1:*", "policy")
        pull = server.bind(zmq.PULL, "tcp://127.0.0.1:*", "telemetry")
        asyncio.run(ask(curve(keys["good"], "tail", linger_ms=5000), router.address))
        assert server.recv(router, TIMEOUT_S)[1].worker_id == "async"
        with Bus(curve(keys["good"], "tail")) as client:
            assert TelemetryClient(client, "env-worker", "w0", pull.address).heartbeat()
            assert server.recv(pull, TIMEOUT_S).service == "env-worker"
        with Bus(curve(keys["intruder"])) as stranger:
            TelemetryClient(stranger, "env-worker", "evil", pull.address).heartbeat()
            refusals.wait(1)
            assert server.recv_before(pull, 0, None) is None


def test_missing_key_files_are_named(tmp_path, keys):
    with Bus(curve(tmp_path)) as bus, pytest.raises(ValueError, match=r"server\.key.* does not exist"):
        bus.connect(zmq.DEALER, "tcp://127.0.0.1:1")
    shutil.copy(keys["good"] / "server.key", tmp_path)
    with Bus(curve(tmp_path)) as bus, pytest.raises(ValueError, match=r"server\.key_secret does not exist"):
        bus.bind(zmq.ROUTER, "tcp://127.0.0.1:*")
    with Bus(curve(keys["intruder"])) as bus, pytest.raises(ValueError, match=r"server\.key_secret"):
        bus.bind(zmq.ROUTER, "tcp://127.0.0.1:*")


def test_binding_beyond_loopback_without_keys_is_refused():
    with Bus(BusConfig(linger_ms=0)) as bus:
        with pytest.raises(ValueError, match=r"refusing to bind the tasks socket at tcp://0\.0\.0\.0:\*"):
            bus.bind(zmq.ROUTER, "tcp://0.0.0.0:*", "tasks")
        bus.bind(zmq.ROUTER, "tcp://127.0.0.1:*", "tasks")  # loopback stays allowed
    with Bus(BusConfig(linger_ms=0, bind_host="0.0.0.0")) as bus, pytest.raises(ValueError, match="keys_dir"):
        bus.bind(zmq.PULL, "tcp://127.0.0.1:5555", "telemetry")  # bind_host is what is bound
    with Bus(BusConfig(linger_ms=0, curve=CurveConfig(allow_insecure_remote=True))) as bus:
        assert bus.bind(zmq.PULL, "tcp://0.0.0.0:*").address.startswith("tcp://0.0.0.0:")


def test_loopback_rule_per_address():
    for address in ("tcp://127.0.0.1:1", "tcp://127.3.0.1:*", "tcp://localhost:1", "tcp://[::1]:1", "tcp://lo:1",
                    "ipc:///tmp/x", "inproc://x"):  # fmt: skip
        assert is_loopback(address), address
    for address in ("tcp://0.0.0.0:1", "tcp://*:1", "tcp://10.1.2.3:1", "tcp://eth0:1", "tcp://no-such-host.invalid:1"):
        assert not is_loopback(address), address
    check_bind_allowed("tcp://10.1.2.3:1", CurveConfig(keys_dir=Path("keys")), "tasks")


def handshake_outcome(server: Bus, pull: object, peer: Bus) -> int:
    """Connect a PUSH of ``peer`` to ``pull``, send one message, and return the first handshake
    event ``pull`` reports (libzmq refuses or admits there; the client only learns at its timeout)."""
    monitor = server.watch_connections(pull, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                       | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)  # fmt: skip
    peer.send(peer.connect(zmq.PUSH, pull.address), Hello(sender="late", nonce=3))
    assert monitor.poll(TIMEOUT_S * 1000), "no handshake event"
    return zmq.utils.monitor.recv_monitor_message(monitor)["event"]


@pytest.mark.parametrize("client", ["trainer", "intruder"])
def test_a_stopped_zap_handler_lets_no_client_in(keys, client):
    # libzmq skips ZAP when no handler is bound unless the domain is enforced: that was fail-open.
    client_keys, name = (keys["good"], "trainer") if client == "trainer" else (keys["intruder"], "client")
    with Bus(curve(keys["good"], "trainer")) as server, Bus(curve(client_keys, name)) as peer:
        pull = server.bind(zmq.PULL, "tcp://127.0.0.1:*", "batches")
        server.curve.stop()  # the handler is gone; the bound socket stays
        assert handshake_outcome(server, pull, peer) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert pull.poll(0) == 0


def test_a_dead_zap_handler_stops_the_service(keys, monkeypatch):
    def broken(self, zap):
        raise RuntimeError("bug in the allow list")

    monkeypatch.setattr("rlbus.curve.CurveGuard._answer", broken)
    died = threading.Event()
    sink = logger.add(lambda _: died.set(), level="CRITICAL", filter=lambda r: "ZAP handler died" in r["message"])
    try:
        with Bus(curve(keys["good"], "trainer")) as server, Bus(curve(keys["intruder"])) as stranger, \
                Bus(curve(keys["intruder"])) as late:  # fmt: skip
            pull = server.bind(zmq.PULL, "tcp://127.0.0.1:*", "batches")
            stranger.send(stranger.connect(zmq.PUSH, pull.address), Hello(sender="s", nonce=1))
            assert died.wait(TIMEOUT_S)  # its ZAP request killed the handler
            with pytest.raises(BusError, match=r"ZAP handler died \(RuntimeError: bug in the allow list\)"):
                server.recv(pull, TIMEOUT_S)
            with pytest.raises(BusError, match="ZAP handler died"):
                server.send(server.bind(zmq.PUSH, "tcp://127.0.0.1:*"), Hello(sender="s", nonce=1))
            # Refused at the handshake by libzmq itself now that no handler answers.
            assert handshake_outcome(server, pull, late) != zmq.EVENT_HANDSHAKE_SUCCEEDED
            assert pull.poll(0) == 0
    finally:
        logger.remove(sink)
