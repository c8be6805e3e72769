"""CurveZMQ on the bus: key files, socket options, the loopback rule and the ZAP allow list.

With ``bus.curve.keys_dir`` set, every socket of a :class:`rlbus.bus.Bus` is a
Curve socket: bound sockets are servers holding the shared server secret,
connecting sockets are clients presenting their own key pair. Curve encrypts
every frame and proves the server's identity to the client; the ZAP handler
run by :class:`CurveGuard` proves the client's, admitting only public keys
found in ``keys_dir/clients/``. Key layout (``rlbus keys`` writes it)::

    server.key                   server public key       every host
    server.key_secret            server key pair         hosts running a binding service
    clients/<name>.key           client public key       hosts running a binding service (the allow list)
    clients/<name>.key_secret    client key pair         only the host that presents <name>

Without keys the bus is plain TCP, which :func:`check_bind_allowed` permits on
loopback addresses only, unless ``allow_insecure_remote`` says the network is trusted.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import shutil
import socket
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from loguru import logger
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from rlbus.config.base import CurveConfig
from rlbus.errors import UserError

SERVER_NAME = "server"
CLIENTS_DIR = "clients"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq asks a context's ZAP handler about each connecting peer (fixed by RFC 27)."""
_HANDSHAKE_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_PROTOCOL_ERRORS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the peer does not use Curve (no bus.curve.keys_dir there?)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "the peer's Curve handshake did not decrypt (wrong server.key there?)",
}
_LOG_FIRST, _LOG_EVERY = 10, 1000  # a peer retrying every 100 ms must not flood the log


def create_keys(out: Path, client_names: list[str]) -> list[Path]:
    """Write the server key pair and one client key pair per name under ``out``; returns the files.
    Existing key files are never overwritten (a new server key locks every host out)."""
    names = [SERVER_NAME] + [f"{CLIENTS_DIR}/{name}" for name in client_names]
    bad = [name for name in client_names if not name or "/" in name or name.startswith(".")]
    if bad or len(set(client_names)) != len(client_names):
        raise ValueError(f"client names must be distinct, non-empty and without '/': {client_names}")
    existing = [out / f"{name}{suffix}" for name in names for suffix in (".key", ".key_secret")
                if (out / f"{name}{suffix}").exists()]  # fmt: skip
    if existing:
        raise ValueError(f"refusing to overwrite existing key files: {', '.join(map(str, existing))}")
    (out / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        written += _create_pair((out / name).parent, Path(name).name)
    return written


def _create_pair(folder: Path, stem: str) -> list[Path]:
    """One key pair, written in a staging folder only this user can enter (mkdtemp makes it 0700) and
    moved into ``folder`` once the secret is 0600: it is never readable by others, even briefly."""
    staging = Path(tempfile.mkdtemp(prefix=".rlbus-keys-", dir=folder))
    try:
        public, secret = zmq.auth.create_certificates(staging, stem)
        os.chmod(secret, 0o600)  # readable by the service's user alone
        placed = []
        for path in (Path(public), Path(secret)):
            os.rename(path, folder / path.name)  # same folder tree: atomic, never a copy
            placed.append(folder / path.name)
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _key_file(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ValueError(f"Curve key file {path} does not exist (create keys with `rlbus keys --out DIR` "
                         "and copy the files this host needs; see docs/security.md)")  # fmt: skip
    public, secret = zmq.auth.load_certificate(path)
    if need_secret and not secret:
        raise ValueError(f"Curve key file {path} holds no secret key")
    return public, secret


def is_loopback(address: str) -> bool:
    """True for ``inproc``/``ipc`` endpoints and tcp hosts that resolve to loopback addresses only."""
    if not address.startswith("tcp://"):
        return True
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if host in ("lo", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass  # a host name or an interface name: resolve it
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False  # "*", an interface such as eth0, or unknown: not provably loopback
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def is_loopback_host(host: str) -> bool:
    """:func:`is_loopback` for a bare host name or address (an HTTP server's ``host``)."""
    return is_loopback(f"tcp://[{host}]:0" if ":" in host else f"tcp://{host}:0")


def check_bind_allowed(address: str, config: CurveConfig, role: str) -> None:
    """Refuse a plain-TCP bind that other hosts could reach (the loopback rule)."""
    if config.keys_dir is not None or config.allow_insecure_remote or is_loopback(address):
        return
    raise UserError(
        f"refusing to bind the {role} socket at {address} without CurveZMQ: a non-loopback address needs "
        "bus.curve.keys_dir (create keys with `rlbus keys --out DIR`, see docs/security.md), or, on a network "
        "where every host is trusted, bus.curve.allow_insecure_remote = true"
    )


def _log_sampled(counter: Counter[str], key: str, text: str) -> None:
    counter[key] += 1
    count = counter[key]
    if count <= _LOG_FIRST or count % _LOG_EVERY == 0:
        logger.warning("{} (#{} on {})", text, count, key)


class CurveGuard:
    """Curve options for the sockets of one bus, and the ZAP handler of its context.

    The handler thread starts with the first bound socket; it answers libzmq's ZAP
    requests from the allow list and watches each bound socket's handshake failures
    (peers without keys, or with the wrong server key, never reach ZAP). Each refused
    peer is logged (sampled) and counted in ``rejected`` under the socket's role.
    """

    def __init__(self, config: CurveConfig, context: zmq.Context, rejected: Counter[str]) -> None:
        assert config.keys_dir is not None
        self.keys_dir, self.client_name = config.keys_dir, config.client_name
        self.context = context
        self.rejected = rejected
        self._client_keys: tuple[bytes, bytes, bytes] | None = None
        self._server_secret: bytes | None = None
        self._allowed: frozenset[bytes] = frozenset()
        self._monitors: queue.SimpleQueue[tuple[zmq.Socket, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: str | None = None
        """Why the ZAP handler died, if it did: the bus then refuses to go on (``Bus.check_alive``)."""

    def secure(self, sock: Any, server: bool, role: str) -> None:
        """Make ``sock`` a Curve server (to be bound) or client (to connect); before bind/connect."""
        if not server:
            server_public, public, secret = self._load_client_keys()
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
            return
        self._start_handler()
        sock.curve_server = True
        sock.curve_secretkey = self._server_secret
        sock.zap_domain = role.encode()  # names the socket in ZAP requests, hence in our logs
        # Without this libzmq admits any Curve key when no ZAP handler is bound (a dead handler
        # thread): with it, a peer that finds no handler is refused.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        # The PAIR is connected here, before any event can be sent, then handed to the handler thread.
        endpoint = f"inproc://rlbus-curve-monitor-{id(sock)}"
        sock.monitor(endpoint, _HANDSHAKE_FAILURES)
        watcher = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
        watcher.connect(endpoint)
        self._monitors.put((watcher, sock))

    def stop(self) -> None:
        """Stop the handler thread (before the context terminates)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        while not self._monitors.empty():  # handed over after the thread's last look
            self._monitors.get()[0].close(linger=0)

    def _load_client_keys(self) -> tuple[bytes, bytes, bytes]:
        if self._client_keys is None:
            server_public, _ = _key_file(self.keys_dir / f"{SERVER_NAME}.key", need_secret=False)
            public, secret = _key_file(self.keys_dir / CLIENTS_DIR / f"{self.client_name}.key_secret", True)
            self._client_keys = (server_public, public, secret)  # type: ignore[assignment]
        return self._client_keys

    def _start_handler(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            _, self._server_secret = _key_file(self.keys_dir / f"{SERVER_NAME}.key_secret", need_secret=True)
            folder = self.keys_dir / CLIENTS_DIR
            self._allowed = frozenset(zmq.auth.load_certificates(folder)) if folder.is_dir() else frozenset()
            if not self._allowed:
                raise ValueError(f"no client public keys (*.key) in {folder}: no peer could connect")
            self._stop.clear()
            ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, args=(ready,), name="curve-zap", daemon=True)
            self._thread.start()
            error = ready.get(timeout=10)
            if error is not None:
                self._thread = None
                raise error
            logger.info("CurveZMQ: admitting {} client key(s) from {}", len(self._allowed), folder)

    def _run(self, ready: queue.SimpleQueue) -> None:
        zap = self.context.socket(zmq.REP, socket_class=zmq.Socket)
        zap.linger = 0
        try:
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            zap.close()
            ready.put(RuntimeError(f"cannot start the Curve ZAP handler at {ZAP_ENDPOINT}: {exc}"))
            return
        ready.put(None)
        watched: dict[zmq.Socket, Any] = {}
        try:
            self._serve(zap, watched)
        except BaseException as exc:  # noqa: BLE001 - any death must be known, whatever killed it
            # Fail closed: with the domain enforced, libzmq now refuses every new peer, and the bus
            # raises on its next operation so the service stops instead of running half-deaf.
            self.failure = f"the Curve ZAP handler died ({type(exc).__name__}: {exc}); refusing every new peer"
            logger.opt(exception=exc).critical("{}", self.failure)
        finally:
            for watcher in watched:
                watcher.close(linger=0)
            zap.close()

    def _serve(self, zap: zmq.Socket, watched: dict[zmq.Socket, Any]) -> None:
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        while not self._stop.is_set():
            while not self._monitors.empty():
                watcher, sock = self._monitors.get()
                watched[watcher] = sock
                poller.register(watcher, zmq.POLLIN)
            for ready_sock, _ in poller.poll(100):  # wakes to pick up new watchers and the stop flag
                if ready_sock is zap:
                    self._answer(zap)
                else:
                    self._report_handshake(ready_sock, watched[ready_sock])

    def _answer(self, zap: zmq.Socket) -> None:
        """One ZAP request (RFC 27): admit a Curve client whose key is in the allow list."""
        frames = zap.recv_multipart()
        if len(frames) < 6:
            return  # libzmq never sends these; nothing to reply to
        _version, request_id, domain, address, _identity, mechanism, *credentials = frames
        client_key = z85.encode(credentials[0]) if mechanism == b"CURVE" and credentials else None
        allowed = client_key in self._allowed
        if not allowed:
            what = f"unknown Curve key {client_key.decode()}" if client_key else f"mechanism {mechanism.decode()}"
            _log_sampled(self.rejected, domain.decode(errors="replace"),
                         f"refused a peer at {address.decode(errors='replace')}: {what}")  # fmt: skip
        status = (b"200", b"OK") if allowed else (b"400", b"client key not authorized")
        zap.send_multipart([b"1.0", request_id, *status, client_key or b"", b""])

    def _report_handshake(self, watcher: zmq.Socket, sock: Any) -> None:
        event = parse_monitor_message(watcher.recv_multipart())
        if event["event"] == zmq.EVENT_MONITOR_STOPPED:
            return
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # the value is an errno
            reason = (f"the handshake broke off ({os.strerror(event['value'])}): a peer without Curve keys, "
                      "or with another server.key?")  # fmt: skip
        else:
            reason = _PROTOCOL_ERRORS.get(event["value"], f"ZMTP protocol error {event['value']:#x}")
        _log_sampled(self.rejected, getattr(sock, "role", "bus"),
                     f"refused a peer on {getattr(sock, 'address', '?')}: {reason}")  # fmt: skip
