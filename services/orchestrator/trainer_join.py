"""A run's orchestrator on a shared trainer: ``RunJoin`` at start, ``RunLeave`` when done.

With ``orchestrator.shared_trainer`` set, no trainer of this run's own pulls the batches: a
shared trainer (``rlbus trainer`` with ``max_concurrent_runs``) trains several runs, each on its
own adapter. The orchestrator tells it about the run on its ``trainer_runs`` ROUTER: ``RunJoin``
with the run's spec, its batch ROUTER (which the trainer then connects to and pulls from with the
usual batch protocol) and its monitor. The trainer answers ``RunJoined`` with the last step it
applied for the run, or ``Refused`` (a run id held by another run, a bad spec): fatal, the user
must fix the config.

The token in ``<output_dir>/orchestrator/run_token`` is created once and reused after restarts:
the same token is the same run coming back (the trainer keeps its progress), another token under
the same run id is a collision. RunJoin is sent again every ``bus.request_timeout_s`` until it is
answered, and again whenever the connection to the trainer is made anew (a restarted trainer
forgets its runs until they join again). Its DEALER queues nothing while the trainer is away
(``IMMEDIATE``), so a trainer that comes back gets one RunJoin, not one per timeout it missed.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any

import zmq
from loguru import logger
from zmq.utils.monitor import parse_monitor_message

from rlbus.bus import Bus, BusSocket
from rlbus.config.base import write_private
from rlbus.messages import Ack, Message, Refused, RunJoin, RunJoined, RunLeave
from rlbus.services.orchestrator.config import OrchestratorConfig, SharedTrainerJoinConfig

TOKEN_FILE = "run_token"
TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")
LEAVE_ATTEMPTS = 3
"""RunLeave is sent this many times (each waiting ``bus.request_timeout_s``) before giving up."""
CONNECTION_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class RunRefused(RuntimeError):
    """The shared trainer refused this run (its reason in the text): the config must change."""


def run_token(folder: Path) -> str:
    """The run's token, kept in ``folder/run_token``: made on the first start, read after that."""
    path = folder / TOKEN_FILE
    if path.is_file():
        token = path.read_text().strip()
        if TOKEN_PATTERN.fullmatch(token):
            return token
        raise ValueError(f"{path} holds {token[:40]!r}, not a run token (32 hex digits): it was not written by "
                         "rlbus; delete it to make a new one (the trainer then takes this run for another)")  # fmt: skip
    token = secrets.token_hex(16)
    write_private(path, token + "\n")
    return token


class TrainerJoin:
    """The runs DEALER to a shared trainer and the state of this run's join."""

    def __init__(self, bus: Bus, config: OrchestratorConfig, shared: SharedTrainerJoinConfig) -> None:
        self.bus, self.shared = bus, shared
        self.timeout_s = config.bus.request_timeout_s
        self.token = run_token(config.output_dir / "orchestrator")
        endpoints = config.bus.endpoints
        self.join_message: dict[str, Any] = {
            "run_id": shared.run_id, "token": self.token, "spec": shared.spec,
            "batches_address": endpoints.orchestrator_batches, "monitor_address": endpoints.monitor_telemetry,
        }  # fmt: skip
        self.sock: BusSocket = bus.open_socket(zmq.DEALER, "runs")
        # Only a connected trainer gets a RunJoin; while it is away a send fails at once (see _send).
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        # Attached before connecting, so the first handshake is seen too.
        self.connections = bus.watch_connections(self.sock, CONNECTION_EVENTS)
        bus.connect_socket(self.sock, shared.runs_address)
        self.nonce: str | None = None
        """The RunJoin waiting for its answer (None: none is)."""
        self.delivered = False
        """That RunJoin went to a connected trainer (and the connection has not dropped since)."""
        self.resend_at = 0.0
        self.trainer_step: int | None = None
        """The trainer's step of this run when it last answered RunJoined (None: not joined yet)."""

    @property
    def sockets(self) -> tuple[zmq.Socket, ...]:
        """What the service's poller must watch for :meth:`handle`."""
        return (self.sock, self.connections)

    @property
    def joined(self) -> bool:
        return self.trainer_step is not None and self.nonce is None

    def start(self, now: float) -> None:
        logger.info("joining the shared trainer at {} as run {!r}", self.shared.runs_address, self.shared.run_id)
        self._join(now)

    def next_deadline(self) -> float | None:
        """When :meth:`handle` must run even without messages: the next resend of RunJoin."""
        return self.resend_at if self.nonce is not None else None

    def handle(self, ready: dict[Any, int], now: float) -> None:
        """Read connection events and replies (``ready`` from the poller), resend when due.
        Raises :class:`RunRefused` when the trainer refuses the run."""
        if self.connections in ready:
            self._on_connection_events(now)
        if self.sock in ready:
            while (reply := self.bus.recv_before(self.sock, time.monotonic(), (RunJoined, Refused, Ack))) is not None:
                self._on_reply(reply)
        if self.nonce is not None and now >= self.resend_at:
            if self.trainer_step is None:
                logger.info("no answer to RunJoin from {} within {:g}s: sending it again", self.shared.runs_address,
                            self.timeout_s)  # fmt: skip
            self._send_join(now)

    def leave(self) -> bool:
        """Tell the trainer the run is done; True once it acknowledged. After ``LEAVE_ATTEMPTS``
        unanswered attempts it gives up with a warning: the trainer keeps the run's slot."""
        for attempt in range(1, LEAVE_ATTEMPTS + 1):
            nonce = secrets.token_hex(8)
            sent = self._send(RunLeave(run_id=self.shared.run_id, token=self.token, nonce=nonce))
            deadline = time.monotonic() + self.timeout_s
            while sent and (reply := self.bus.recv_before(self.sock, deadline, (Ack, Refused, RunJoined))):
                if isinstance(reply, Ack) and reply.ref == nonce:
                    logger.info("left the shared trainer: run {!r} is done", self.shared.run_id)
                    return True
                if isinstance(reply, Refused) and reply.request == "RunLeave":
                    logger.warning("the shared trainer refused RunLeave of run {!r}: {}", self.shared.run_id,
                                   reply.reason)  # fmt: skip
                    return False
            if not sent:
                self._wait_for_connection(deadline)
            logger.warning("no answer to RunLeave from {} (attempt {}/{})", self.shared.runs_address, attempt,
                           LEAVE_ATTEMPTS)  # fmt: skip
        logger.warning("giving up leaving the shared trainer at {}: it keeps run {!r}'s slot until it restarts",
                       self.shared.runs_address, self.shared.run_id)  # fmt: skip
        return False

    # ------------------------------------------------------------------ internals

    def _join(self, now: float) -> None:
        self.nonce = secrets.token_hex(8)
        self._send_join(now)

    def _send_join(self, now: float) -> None:
        assert self.nonce is not None
        self.delivered = self._send(RunJoin(**self.join_message, nonce=self.nonce))
        self.resend_at = now + self.timeout_s

    def _send(self, message: Message) -> bool:
        """Send without waiting; False when no trainer is connected (it is sent again later)."""
        try:
            self.sock.send_multipart(self.bus.frames(self.sock, message, None), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _on_connection_events(self, now: float) -> None:
        while self.connections.poll(0):
            event = parse_monitor_message(self.connections.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.delivered = False
                logger.warning("lost the connection to the shared trainer at {}", self.shared.runs_address)
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                logger.info("connected to the shared trainer at {}", self.shared.runs_address)
                if self.nonce is None:
                    self._join(now)  # a trainer that reappears may have restarted and forgotten the run
                elif not self.delivered:
                    self._send_join(now)

    def _on_reply(self, reply: Message) -> None:
        if isinstance(reply, Refused) and reply.request == "RunJoin":
            raise RunRefused(f"the shared trainer at {self.shared.runs_address} refused run "
                             f"{self.shared.run_id!r}: {reply.reason}")  # fmt: skip
        if not isinstance(reply, RunJoined) or reply.nonce != self.nonce or reply.run_id != self.shared.run_id:
            return  # an answer to an earlier attempt, already superseded
        self.nonce = None
        self.trainer_step = reply.step
        logger.info("run {!r} joined the shared trainer, which has trained it up to step {}", reply.run_id,
                    reply.step)  # fmt: skip

    def _wait_for_connection(self, deadline: float) -> None:
        """Until the trainer connects or ``deadline`` passes: a RunLeave cannot go out before."""
        while self.connections.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            event = parse_monitor_message(self.connections.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
