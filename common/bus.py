"""Sockets of the rlbus bus: created by role, typed send/receive, handshakes.

A :class:`Bus` owns a ZeroMQ context and the :class:`BusConfig` every socket is
configured from, CurveZMQ keys included (:mod:`rlbus.curve`: bound sockets are
Curve servers behind a ZAP allow list, the others Curve clients). Frames that do
not decode are logged, counted in ``bus.stats`` and skipped, so one bad peer
cannot stall a receiver. Every wait has a deadline and ends in :class:`BusTimeout`
saying what was awaited, where, for how long.
Pub/sub channels and telemetry build on it in :mod:`rlbus.pubsub`;
:mod:`rlbus.abus` mirrors both for asyncio, reusing their helpers.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from loguru import logger

from rlbus.codec import DecodeError, Frame, decode, encode
from rlbus.config.base import BusConfig
from rlbus.curve import CurveGuard, check_bind_allowed
from rlbus.messages import Message

Expected = type[Message] | tuple[type[Message], ...] | None
Received = Message | tuple[bytes, Message]
"""What a receive returns: the message, or ``(identity, message)`` on a ROUTER."""

# A misbehaving peer can send thousands of bad frames a second; log the first
# few of each kind per socket role, then only every ``_LOG_EVERY``-th.
_LOG_FIRST = 10
_LOG_EVERY = 1000
# Subscription frames read per pump: a flood of bad ones must not starve the owner's other sockets.
MAX_PUMP_READS = 1000


class BusError(RuntimeError):
    """A bus operation failed; the text names the socket and what went wrong."""


class BusTimeout(BusError, TimeoutError):
    """Nothing usable arrived before the deadline."""


class PeerUnreachable(BusError):
    """A ROUTER was asked to send to an identity that is not connected (any more)."""


@dataclass
class BusStats:
    """Counters of one bus, keyed by socket role."""

    decode_errors: Counter[str] = field(default_factory=Counter)
    """Messages skipped because they did not decode or had an unexpected type."""
    rejected_reasons: Counter[str] = field(default_factory=Counter)
    """The same messages keyed by ``DecodeError.reason`` (``bad_array``, ``too_many_frames`` ...)."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Messages dropped instead of blocking the sender (telemetry at its HWM)."""
    auth_rejected: Counter[str] = field(default_factory=Counter)
    """Peers refused by CurveZMQ on a bound socket (unknown key, no Curve, wrong server key)."""

    def metrics(self) -> dict[str, float]:
        """``bus/...`` metrics of the rejections and drops so far; empty while there were none."""
        metrics: dict[str, float] = {}
        if self.decode_errors:
            metrics["bus/rejected_messages"] = float(sum(self.decode_errors.values()))
            metrics.update({f"bus/rejected_by_socket/{k}": float(n) for k, n in self.decode_errors.items()})
            metrics.update({f"bus/rejected_by_reason/{k}": float(n) for k, n in self.rejected_reasons.items()})
        if self.dropped:
            metrics["bus/dropped_telemetry"] = float(sum(self.dropped.values()))
        if rejected := dict(self.auth_rejected):  # a copy: the Curve handler thread adds to it
            metrics["bus/auth_rejected"] = float(sum(rejected.values()))
            metrics.update({f"bus/auth_rejected_by_socket/{k}": float(n) for k, n in rejected.items()})
        return metrics


class BusSocket(zmq.Socket):
    """A zmq socket that knows its role and address, for logs and errors."""

    # pyzmq only allows plain attributes that are declared on the class.
    role: str = ""
    address: str = ""


def bind_address(endpoint: str, bind_host: str | None) -> str:
    """``endpoint`` with its tcp host replaced by ``bind_host`` (others unchanged): every process
    shares one endpoint table while a binding service listens on e.g. ``0.0.0.0``."""
    if bind_host is None or not endpoint.startswith("tcp://"):
        return endpoint
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"tcp endpoint {endpoint!r} is not of the form tcp://host:port")
    return f"tcp://{bind_host}:{port}"


def configure_socket(sock: zmq.Socket, socket_type: int, config: BusConfig) -> None:
    """Set the options every bus socket needs, from ``config``."""
    sock.setsockopt(zmq.SNDHWM, config.send_hwm)
    sock.setsockopt(zmq.RCVHWM, config.send_hwm)
    # Without a finite linger a process whose peer is gone hangs on exit.
    sock.setsockopt(zmq.LINGER, config.linger_ms)
    # libzmq disconnects a peer that sends a larger frame, before it is buffered.
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_frame_bytes)
    sock.setsockopt(zmq.IPV6, 0)
    if socket_type == zmq.ROUTER:
        # Sending to a vanished peer must raise (PeerUnreachable), not drop silently.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    elif socket_type == zmq.XPUB:
        # Report every subscription, not only the first per topic, so every
        # subscriber that joins gets its own Hello.
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    elif socket_type == zmq.SUB:
        # One channel per socket: subscribe to everything, no topic frames.
        sock.setsockopt(zmq.SUBSCRIBE, b"")


def type_names(expected: Expected) -> str:
    if expected is None:
        return "any message"
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(t.__name__ for t in types)


def is_subscription(frame: bytes) -> bool:
    """True for an XPUB subscribe notification (first byte 1), not an unsubscribe."""
    return frame[:1] == b"\x01"


def subscription_reason(frames: list[bytes]) -> str | None:
    """Why what an XPUB received is not a (un)subscription (an XSUB peer may send anything);
    None when it is one: a single frame starting with byte 1 or 0."""
    if len(frames) != 1:
        return f"{len(frames)} frames, where a subscription is one"
    if frames[0][:1] not in (b"\x00", b"\x01"):
        return f"a {len(frames[0])}-byte frame starting {frames[0][:8]!r}, where a subscription starts with 0 or 1"
    return None


def remaining_ms(deadline: float) -> int:
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


def log_sampled(counter: Counter[str], key: str, text: str) -> None:
    # Every one is logged at debug level; warnings are sampled so a flood cannot fill the disk.
    count = counter[key]
    level = "WARNING" if count <= _LOG_FIRST or count % _LOG_EVERY == 0 else "DEBUG"
    logger.log(level, "{} (#{} on {})", text, count, key)


class BusCore:
    """What the sync and asyncio buses share: sockets by role, framing, decoding."""

    socket_class: type[zmq.Socket] = BusSocket
    context_class: type[zmq.Context] = zmq.Context

    def __init__(self, config: BusConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.stats = BusStats()
        self._owns_context = context is None
        self.context = context if context is not None else self.context_class()
        self._sockets: list[zmq.Socket] = []
        self._reject_handlers: dict[int, Callable[[bytes | None, DecodeError], None]] = {}
        self.curve = (CurveGuard(config.curve, self.context, self.stats.auth_rejected)
                      if config.curve.keys_dir is not None else None)  # fmt: skip
        # Checked by the codec before parsing; frames are also capped by MAXMSGSIZE in libzmq.
        self._limits = {
            "max_frames": config.max_frames,
            "max_header_bytes": config.max_header_bytes,
            "max_frame_bytes": config.max_frame_bytes,
            "max_payload_bytes": config.max_payload_bytes,
        }

    def bind(self, socket_type: int, address: str, role: str | None = None) -> Any:
        """A socket bound at ``address`` (tcp host replaced by ``config.bind_host``; port may be ``*``)."""
        endpoint = bind_address(address, self.config.bind_host)
        check_bind_allowed(endpoint, self.config.curve, role or zmq.SocketType(socket_type).name.lower())
        sock = self.open_socket(socket_type, role, server=True)
        sock.bind(endpoint)
        sock.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        logger.debug("{} {} bound at {}", sock.role, zmq.SocketType(socket_type).name, sock.address)
        return sock

    def connect(self, socket_type: int, address: str, role: str | None = None) -> Any:
        """A socket connected to ``address``; zmq reconnects on its own if the peer restarts."""
        return self.connect_socket(self.open_socket(socket_type, role), address)

    def connect_socket(self, sock: Any, address: str) -> Any:
        """Connect a socket from :meth:`open_socket` (after setting what it needs) to ``address``."""
        sock.connect(address)
        sock.address = address
        logger.debug("{} {} connected to {}", sock.role, zmq.SocketType(sock.type).name, address)
        return sock

    def watch_connections(self, sock: Any, events: int) -> Any:
        """A zmq monitor socket reporting ``events`` of ``sock``, closed with the bus; call it
        before connecting, so the first handshake is not missed."""
        monitor = sock.get_monitor_socket(events)
        self._sockets.append(monitor)
        return monitor

    def open_socket(self, socket_type: int, role: str | None = None, socket_class: type[zmq.Socket] | None = None,
                    server: bool = False) -> Any:  # fmt: skip
        """A configured socket owned by this bus (closed by :meth:`close`), not yet bound (``server``)
        or connected; Curve options are set here. ``socket_class`` overrides the bus's (a plain
        socket on an asyncio bus, for sends that never wait)."""
        sock = self.context.socket(socket_type, socket_class=socket_class or self.socket_class)
        configure_socket(sock, socket_type, self.config)
        sock.role = role or zmq.SocketType(socket_type).name.lower()
        self._sockets.append(sock)  # first: closed by close() even when its keys fail to load
        if self.curve is not None:
            self.curve.secure(sock, server, sock.role)
        return sock

    def close(self) -> None:
        """Close every socket of this bus (each lingers ``config.linger_ms``)."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self.curve is not None:
            self.curve.stop()  # its ZAP and monitor sockets would keep the context from terminating
        if self._owns_context:
            self.context.term()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def check_alive(self) -> None:
        """Raise :class:`BusError` once the Curve ZAP handler died (rlbus.curve: fail closed)."""
        if self.curve is not None and self.curve.failure is not None:
            raise BusError(self.curve.failure)

    def frames(self, sock: Any, message: Message, identity: bytes | None) -> list[Frame]:
        """Wire frames of ``message``, led by ``identity`` on a ROUTER."""
        self.check_alive()
        is_router = sock.type == zmq.ROUTER
        if is_router != (identity is not None):
            raise ValueError(f"{sock.role}: an identity is needed on ROUTER sockets and only there")
        frames = encode(message)
        return [identity, *frames] if is_router else frames

    def raise_unreachable(self, sock: Any, identity: bytes | None, exc: zmq.ZMQError) -> None:
        if exc.errno == zmq.EHOSTUNREACH:
            raise PeerUnreachable(f"{sock.role} {sock.address}: peer {identity!r} is not connected") from None
        if exc.errno == zmq.EAGAIN and identity is not None:
            raise PeerUnreachable(f"{sock.role} {sock.address}: peer {identity!r:.40} is not reading its replies "
                                  f"({self.config.send_hwm} are queued); not waiting for it") from None  # fmt: skip
        raise exc

    @staticmethod
    def send_flags(identity: bytes | None) -> int:
        # A ROUTER serves many peers: one that never reads its replies must not block the
        # sender for all the others, so at that peer's high-water mark the send fails at once.
        return zmq.NOBLOCK if identity is not None else 0

    def decode_frames(self, sock: Any, frames: list[Any], expected: Expected) -> Received | None:
        """The decoded message (with identity on a ROUTER), or None if it was skipped."""
        self.check_alive()
        identity = None
        if sock.type == zmq.ROUTER:
            identity, frames = frames[0].bytes, frames[1:]
        try:
            message = decode(frames, expected, **self._limits)
        except DecodeError as exc:
            self.count_decode_error(sock, str(exc), identity, exc.reason)
            handler = self._reject_handlers.get(id(sock))
            if handler is not None:
                handler(identity, exc)
            return None
        return (identity, message) if identity is not None else message

    def answer_rejected(self, sock: Any, handler: Callable[[bytes | None, DecodeError], None]) -> None:
        """Call ``handler(identity, error)`` for every message ``sock`` rejects (after counting it),
        so the service can answer the sender instead of leaving it to resend forever."""
        self._reject_handlers[id(sock)] = handler

    def count_decode_error(self, sock: Any, text: str, identity: bytes | None = None,
                           reason: str = "unexpected_type") -> None:  # fmt: skip
        """Count a rejected message under the socket's role and ``reason``, and log it (sampled)."""
        self.stats.decode_errors[sock.role] += 1
        self.stats.rejected_reasons[reason] += 1
        peer = f" from {identity!r:.40}" if identity is not None else ""
        # The text quotes peer-chosen bytes: one line, bounded, so a peer cannot forge or flood log lines.
        text = text.replace("\r", "\\r").replace("\n", "\\n")[:500]
        log_sampled(self.stats.decode_errors, sock.role,
                     f"rejected a message{peer} on {sock.role} socket {sock.address}: {text}")  # fmt: skip

    def joined(self, sock: Any, frames: list[bytes]) -> bool:
        """True if ``frames`` (read from an XPUB) subscribe a new peer; anything but a
        (un)subscription is counted and logged like a message that does not decode."""
        reason = subscription_reason(frames)
        if reason is not None:
            self.count_decode_error(sock, f"not a subscription: {reason}", reason="not_a_subscription")
            return False
        return is_subscription(frames[0])

    def timeout(self, sock: Any, what: str, timeout_s: float) -> BusTimeout:
        return BusTimeout(f"no {what} within {timeout_s:g}s on {sock.role} socket {sock.address}")


class Bus(BusCore):
    """Blocking bus for services with a plain loop."""

    def send(self, sock: BusSocket, message: Message, identity: bytes | None = None) -> None:
        """Send ``message`` (after ``identity`` on a ROUTER); blocks while the peer's queue is full,
        except on a ROUTER, where that raises PeerUnreachable. Array buffers are sent without copying: do not modify them afterwards."""
        frames = self.frames(sock, message, identity)
        try:
            sock.send_multipart(frames, self.send_flags(identity), copy=False)
        except zmq.ZMQError as exc:
            self.raise_unreachable(sock, identity, exc)

    def recv(self, sock: BusSocket, timeout_s: float, expected: Expected = None, what: str = "message") -> Any:
        """The next valid message (``(identity, message)`` on a ROUTER) within ``timeout_s``.
        Malformed or unexpected ones are counted and skipped; arrays view the frames (no copy)."""
        result = self.recv_before(sock, time.monotonic() + timeout_s, expected)
        if result is None:
            raise self.timeout(sock, what, timeout_s)
        return result

    def recv_before(self, sock: BusSocket, deadline: float, expected: Expected) -> Received | None:
        """Like :meth:`recv` with a ``time.monotonic()`` deadline; None when it passed."""
        self.check_alive()
        while sock.poll(remaining_ms(deadline)):
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            result = self.decode_frames(sock, frames, expected)
            if result is not None:
                return result
            if time.monotonic() >= deadline:  # a stream of bad messages must not extend the wait
                break
        return None

    def request(self, sock: BusSocket, message: Message, expected: Expected, timeout_s: float | None = None,
                retries: int = 0, what: str | None = None) -> Message:  # fmt: skip
        """Send ``message`` on a DEALER and wait for the reply, resending up to ``retries`` times.
        A resent request may be served twice; requests must be idempotent."""
        timeout_s = timeout_s or self.config.request_timeout_s
        what = what or f"{type_names(expected)} reply to {type(message).__name__}"
        for attempt in range(1, retries + 2):
            self.send(sock, message)
            result = self.recv_before(sock, time.monotonic() + timeout_s, expected)
            if result is not None:
                return result
            logger.warning("no {} on {} after attempt {}/{}", what, sock.address, attempt, retries + 1)
        raise self.timeout(sock, f"{what} after {retries + 1} attempt(s)", timeout_s)
