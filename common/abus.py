"""asyncio twin of :mod:`rlbus.bus`, for services built around an event loop.

Same sockets, options, framing, decode-error accounting and timeout messages
(all shared through :class:`rlbus.bus.BusCore`); only the waiting differs:
``send``, ``recv``, ``request``, ``Publisher.pump`` and ``wait_ready`` are
coroutines. Telemetry needs no event loop: use :class:`rlbus.pubsub.TelemetryClient`
with an :class:`AsyncBus` as well.
"""

from __future__ import annotations

import time
from typing import Any

import zmq
import zmq.asyncio
from loguru import logger

from rlbus.bus import MAX_PUMP_READS, BusCore, Expected, Received, remaining_ms, type_names
from rlbus.messages import Hello, Message
from rlbus.pubsub import SubscriberBase


class AsyncBusSocket(zmq.asyncio.Socket):
    """An asyncio zmq socket that knows its role and address, for logs and errors."""

    # pyzmq only allows plain attributes that are declared on the class.
    role: str = ""
    address: str = ""


class AsyncBus(BusCore):
    """Bus whose waits are coroutines; sockets must be used from the loop's thread."""

    socket_class = AsyncBusSocket
    context_class = zmq.asyncio.Context

    async def send(self, sock: AsyncBusSocket, message: Message, identity: bytes | None = None) -> None:
        """Send ``message`` (after ``identity`` on a ROUTER); waits while the peer's queue is full
        (on a ROUTER: raises PeerUnreachable instead).
        Array buffers are sent without copying: do not modify them afterwards."""
        frames = self.frames(sock, message, identity)
        try:
            await sock.send_multipart(frames, self.send_flags(identity), copy=False)
        except zmq.ZMQError as exc:
            self.raise_unreachable(sock, identity, exc)

    async def recv(self, sock: AsyncBusSocket, timeout_s: float, expected: Expected = None,
                   what: str = "message") -> Any:  # fmt: skip
        """The next valid message (``(identity, message)`` on a ROUTER) within ``timeout_s``."""
        result = await self.recv_before(sock, time.monotonic() + timeout_s, expected)
        if result is None:
            raise self.timeout(sock, what, timeout_s)
        return result

    async def recv_before(self, sock: AsyncBusSocket, deadline: float, expected: Expected) -> Received | None:
        """Like :meth:`recv` with a ``time.monotonic()`` deadline; None when it passed."""
        # poll + non-blocking recv (not wait_for(recv)) so that, like the sync bus,
        # a message already queued at the deadline is still returned.
        self.check_alive()
        while await sock.poll(remaining_ms(deadline)):
            try:
                frames = await sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # Another coroutine took the message between poll and recv.
                continue
            result = self.decode_frames(sock, frames, expected)
            if result is not None:
                return result
            if time.monotonic() >= deadline:  # a stream of bad messages must not extend the wait
                break
        return None

    async def request(self, sock: AsyncBusSocket, message: Message, expected: Expected, timeout_s: float | None = None,
                      retries: int = 0, what: str | None = None) -> Message:  # fmt: skip
        """Send ``message`` on a DEALER and await the reply, resending up to ``retries`` times.
        A resent request may be served twice; requests must be idempotent."""
        timeout_s = timeout_s or self.config.request_timeout_s
        what = what or f"{type_names(expected)} reply to {type(message).__name__}"
        for attempt in range(1, retries + 2):
            await self.send(sock, message)
            result = await self.recv_before(sock, time.monotonic() + timeout_s, expected)
            if result is not None:
                return result
            logger.warning("no {} on {} after attempt {}/{}", what, sock.address, attempt, retries + 1)
        raise self.timeout(sock, f"{what} after {retries + 1} attempt(s)", timeout_s)


class AsyncPublisher:
    """XPUB side of a pub/sub channel (see :class:`rlbus.pubsub.Publisher`), for asyncio."""

    def __init__(self, bus: AsyncBus, address: str, sender: str, role: str = "announce") -> None:
        self.bus = bus
        self.sender = sender
        self.sock: AsyncBusSocket = bus.bind(zmq.XPUB, address, role)
        self.num_greetings = 0

    @property
    def address(self) -> str:
        return self.sock.address

    async def pump(self, timeout_s: float = 0.0) -> int:
        """Greet the subscribers that joined since the last call; returns how many joined."""
        num_joined, deadline = 0, time.monotonic() + timeout_s
        for _ in range(MAX_PUMP_READS):
            if not await self.sock.poll(remaining_ms(deadline) if num_joined == 0 else 0):
                break
            num_joined += self.bus.joined(self.sock, await self.sock.recv_multipart())
        if num_joined:
            # One Hello serves every subscriber that joined; the others ignore it.
            self.num_greetings += 1
            await self.bus.send(self.sock, Hello(sender=self.sender, nonce=self.num_greetings))
        return num_joined

    async def publish(self, message: Message) -> None:
        await self.pump()
        await self.bus.send(self.sock, message)


class AsyncSubscriber(SubscriberBase):
    """SUB side of a pub/sub channel (see :class:`rlbus.pubsub.Subscriber`), for asyncio."""

    bus: AsyncBus

    async def wait_ready(self, timeout_s: float | None = None) -> Hello:
        """Return the publisher's first ``Hello``; every later message will arrive."""
        timeout_s = timeout_s or self.bus.config.handshake_timeout_s
        deadline = time.monotonic() + timeout_s
        while (message := await self.bus.recv_before(self.sock, deadline, None)) is not None:
            if isinstance(message, Hello):
                self.ready = True
                return message
            self._early.append(message)
        raise self.bus.timeout(self.sock, "Hello from the publisher", timeout_s)

    async def recv(self, timeout_s: float, expected: Expected = None, what: str = "published message") -> Message:
        """The next published message other than ``Hello``."""
        if (early := self._take_early(expected)) is not None:
            return early
        deadline = time.monotonic() + timeout_s
        while (message := await self.bus.recv_before(self.sock, deadline, self._accepted(expected))) is not None:
            if self._keep(message, expected):
                return message
        raise self.bus.timeout(self.sock, what, timeout_s)
