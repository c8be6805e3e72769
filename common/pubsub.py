"""Pub/sub channels and telemetry on top of :mod:`rlbus.bus`.

Pub/sub starts with a handshake, not sleeps: the :class:`Publisher`'s XPUB answers
each subscription with a ``Hello``; after its first ``Hello`` a :class:`Subscriber`
gets every message. :class:`TelemetryClient` pushes heartbeats, metrics and events
to the monitor without ever blocking its service. :mod:`rlbus.abus` has the
asyncio subscriber and publisher, built on :class:`SubscriberBase`.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from typing import Any

import zmq

from rlbus.bus import MAX_PUMP_READS, Bus, BusCore, BusSocket, Expected, log_sampled, remaining_ms
from rlbus.codec import encode
from rlbus.messages import Event, Heartbeat, Hello, Message, MetricsReport


class Publisher:
    """The XPUB side of a pub/sub channel; greets every new subscriber with a ``Hello``.

    The owning loop calls :meth:`pump` whenever the socket is readable (or
    regularly); :meth:`publish` pumps first, so greetings precede messages.
    Like any PUB, it drops messages for a subscriber whose queue is full.
    """

    def __init__(self, bus: Bus, address: str, sender: str, role: str = "announce") -> None:
        self.bus = bus
        self.sender = sender
        self.sock: BusSocket = bus.bind(zmq.XPUB, address, role)
        self.num_greetings = 0

    @property
    def address(self) -> str:
        return self.sock.address

    def pump(self, timeout_s: float = 0.0) -> int:
        """Greet the subscribers that joined since the last call (waiting up to ``timeout_s``
        for the first); returns how many joined."""
        num_joined, deadline = 0, time.monotonic() + timeout_s
        for _ in range(MAX_PUMP_READS):
            if not self.sock.poll(remaining_ms(deadline) if num_joined == 0 else 0):
                break
            num_joined += self.bus.joined(self.sock, self.sock.recv_multipart(zmq.NOBLOCK))
        if num_joined:
            # One Hello serves every subscriber that joined; the others ignore it.
            self.num_greetings += 1
            self.bus.send(self.sock, Hello(sender=self.sender, nonce=self.num_greetings))
        return num_joined

    def publish(self, message: Message) -> None:
        self.pump()
        self.bus.send(self.sock, message)


class SubscriberBase:
    """State shared by the sync and asyncio subscribers."""

    def __init__(self, bus: BusCore, address: str, role: str = "announce") -> None:
        self.bus = bus
        self.sock = bus.connect(zmq.SUB, address, role)
        self.ready = False
        # Messages that beat the first Hello: the subscription was already live,
        # so they are kept and returned before anything newer.
        self._early: deque[Message] = deque()

    def _take_early(self, expected: Expected) -> Message | None:
        while self._early:
            message = self._early.popleft()
            if expected is None or isinstance(message, expected):
                return message
            self.bus.count_decode_error(self.sock, f"unexpected message {type(message).__name__} here")
        return None

    def _accepted(self, expected: Expected) -> Expected:
        # Hellos greeting later subscribers reach everyone: accept them so they
        # are dropped quietly instead of counted as unexpected.
        if expected is None:
            return None
        return (Hello, *(expected if isinstance(expected, tuple) else (expected,)))

    def _keep(self, message: Message, expected: Expected) -> bool:
        return not isinstance(message, Hello) or (expected is not None and issubclass(Hello, expected))


class Subscriber(SubscriberBase):
    """The SUB side of a pub/sub channel: connect, :meth:`wait_ready`, then :meth:`recv`."""

    bus: Bus

    def wait_ready(self, timeout_s: float | None = None) -> Hello:
        """Block until the publisher's first ``Hello``; every later message will arrive."""
        timeout_s = timeout_s or self.bus.config.handshake_timeout_s
        deadline = time.monotonic() + timeout_s
        while (message := self.bus.recv_before(self.sock, deadline, None)) is not None:
            if isinstance(message, Hello):
                self.ready = True
                return message
            self._early.append(message)
        raise self.bus.timeout(self.sock, "Hello from the publisher", timeout_s)

    def recv(self, timeout_s: float, expected: Expected = None, what: str = "published message") -> Message:
        """The next published message other than ``Hello``."""
        if (early := self._take_early(expected)) is not None:
            return early
        deadline = time.monotonic() + timeout_s
        while (message := self.bus.recv_before(self.sock, deadline, self._accepted(expected))) is not None:
            if self._keep(message, expected):
                return message
        raise self.bus.timeout(self.sock, what, timeout_s)


class TelemetryClient:
    """PUSH to the monitor that never blocks: at the HWM, messages are dropped and counted.

    While the monitor is down, messages queue (up to ``send_hwm``) and are
    delivered once it binds. Works with a sync or an asyncio bus (it always
    uses a plain socket, since a non-blocking send needs no event loop).
    """

    def __init__(self, bus: BusCore, service: str, replica_id: str, address: str | None = None) -> None:
        self.bus = bus
        self.service, self.replica_id = service, replica_id
        self.host, self.pid, self.started_at = socket.gethostname(), os.getpid(), time.time()
        self.sock: BusSocket = bus.connect_socket(bus.open_socket(zmq.PUSH, "telemetry", socket_class=BusSocket),
                                                  address or bus.config.endpoints.monitor_telemetry)  # fmt: skip
        self.num_dropped = 0

    def send(self, message: Message) -> bool:
        """Queue ``message`` for the monitor; False if it was dropped."""
        try:
            self.sock.send_multipart(encode(message), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.num_dropped += 1
            self.bus.stats.dropped[self.sock.role] += 1
            log_sampled(self.bus.stats.dropped, self.sock.role, f"monitor at {self.sock.address} not keeping up")
            return False
        return True

    def heartbeat(self, status: str = "ready", step: int | None = None, waiting_for: str | None = None,
                  waiting_since: float | None = None) -> bool:  # fmt: skip
        return self.send(Heartbeat(
            service=self.service, replica_id=self.replica_id, host=self.host, pid=self.pid,
            started_at=self.started_at, sent_at=time.time(), status=status, step=step,  # type: ignore[arg-type]
            waiting_for=waiting_for, waiting_since=waiting_since,
        ))  # fmt: skip

    def metrics(self, step: int, metrics: dict[str, float]) -> bool:
        """Report ``metrics`` of ``step``, with this bus's ``bus/rejected_messages`` (and the
        other counts of :meth:`BusStats.metrics`) once any message was rejected or dropped."""
        metrics = {**self.bus.stats.metrics(), **metrics}
        return self.send(MetricsReport(
            service=self.service, replica_id=self.replica_id, step=step, sent_at=time.time(), metrics=metrics,
        ))  # fmt: skip

    def event(self, kind: str, message: str, level: str = "info", **fields: Any) -> bool:
        return self.send(Event(
            service=self.service, replica_id=self.replica_id, sent_at=time.time(), level=level,  # type: ignore[arg-type]
            kind=kind, message=message, fields=fields,
        ))  # fmt: skip
