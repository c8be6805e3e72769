"""Weight fan-out between replicas: a replica that fetched and verified a step serves it to peers.

Without it every replica pulls every step from the trainer, whose upload then grows with the
number of replicas. A :class:`WeightRelay` runs in the process that holds a replica's receive
buffers and answers ``WeightsFetch`` for the step it holds from those very buffers (no copy),
bucket for bucket as the trainer's manifest lays the step out. A peer configured with relay
addresses (:func:`fetch_from_sources`) tries them first and falls back to the trainer on a
refusal, a silence or a corrupt bucket.

Trust stays with the trainer: the peer checks every tensor against the manifest of the
trainer's own ``WeightsAnnounced`` (xxh3, shape, size, bucket), exactly as when the trainer sends
it, so a faulty or hostile relay can delay a step but never get bad weights loaded.

Buckets are relayed as they arrive: the owner's fetch (:func:`fetch_from_sources` given the relay)
tells the relay each bucket once all of its tensors passed their checks against the manifest, and
the relay serves it from then on, so a tree of relays forwards a step bucket by bucket instead of
one whole fetch per level. A request for a bucket not verified yet, or for a step newer than the
relay's, is parked (the relay is usually about to have it) and answered once it does, or refused
when the relay moves on to another step, when its fetch fails, or after ``wait_s``. The peer
loads nothing until its own fetch of the whole step completed and verified, as always.

Buffers are reused from step to step (:class:`rlbus.weights_fetch.Staging`): the relay forgets
everything of a step (verified buckets included) in :meth:`WeightRelay.begin_fetch`, which comes
*before* a fetch writes the buffers; a bucket of it still queued in zmq when they change arrives
altered and fails the peer's checksum (refused, never loaded: the peer then takes the step from
its next source). Only the full weights are relayed (adapters are small).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import zmq
from loguru import logger

from rlbus.bus import Bus, BusError, PeerUnreachable
from rlbus.codec import DecodeError
from rlbus.config.base import BusConfig
from rlbus.messages import Refused, WeightsAnnounced, WeightsBucket, WeightsFetch, WeightsQuery
from rlbus.weight_codec import NamedArray, WeightsCorrupt
from rlbus.weights import CHUNK_BYTES, chunked_bucket
from rlbus.weights_fetch import FULL_WEIGHTS, FetchedStep, HeldStep, Staging, fetch_weights

MAX_PARKED = 1024
"""Requests a relay holds for a step it does not have yet; more are refused at once."""
RELAY_ROLE = "weights-relay"


@dataclass
class RelayedStep:
    """The step the relay serves: the trainer's announcement and each verified bucket's tensors
    (None: not verified yet); ``complete`` once the owner's fetch of all of it succeeded."""

    announced: WeightsAnnounced
    buckets: list[list[tuple[str, np.ndarray]] | None]
    complete: bool = False

    @property
    def step(self) -> int:
        return self.announced.step


@dataclass
class Parked:
    identity: bytes
    request: WeightsFetch
    deadline: float


class WeightRelay:
    """Serves the step its owner fetches or holds to peer replicas from a background thread owning a ROUTER.

    The owner calls :meth:`begin_fetch` before each fetch into the buffers, :meth:`bucket_ready` for
    each bucket verified, then :meth:`hold` with the verified step, or :meth:`fetch_failed`
    (:func:`fetch_from_sources` does all of it when given the relay). Counters: ``bytes_served``,
    ``buckets_served``, ``num_refused``."""

    def __init__(self, bus: Bus, address: str, wait_s: float = 30.0, chunk_bytes: int = CHUNK_BYTES) -> None:
        if wait_s <= 0 or chunk_bytes < 1:
            raise ValueError(f"wait_s and chunk_bytes must be positive, got {wait_s} and {chunk_bytes}")
        self.bus, self.wait_s, self.chunk_bytes = bus, wait_s, chunk_bytes
        self._bind_address = address
        self.address = ""
        self._current: RelayedStep | None = None
        """The step being fetched into the buffers (its verified buckets served) or held whole."""
        self._failed: int | None = None
        """The step whose fetch failed last: requests for it (or older) are refused, not parked."""
        self._parked: list[Parked] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._bind_error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="weight-relay", daemon=True)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self.bytes_served = self.buckets_served = self.num_refused = 0

    # ------------------------------------------------------------ owner side

    def start(self, timeout_s: float = 10.0) -> WeightRelay:
        """Bind on the thread; raises what the bind raised (e.g. the port is in use)."""
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._bind_error is not None:
            raise BusError(f"weight relay could not bind {self._bind_address}: "
                           f"{self._bind_error or f'no answer within {timeout_s:g}s'}") from self._bind_error  # fmt: skip
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            os.close(self._wake_read)
            os.close(self._wake_write)

    def begin_fetch(self, announced: WeightsAnnounced) -> None:
        """The buffers are about to be written with ``announced``'s step: stop serving anything
        served so far (the old step, or buckets of this one from a source that failed)."""
        with self._lock:
            self._current = RelayedStep(announced, [None] * announced.num_buckets)
            self._failed = None
        self._wake()

    def bucket_ready(self, step: int, index: int, tensors: list[NamedArray]) -> None:
        """Bucket ``index`` of ``step`` passed its checks (``tensors``: views of the buffers, valid until
        the next :meth:`begin_fetch`): serve it. Ignored unless ``step`` is the one being fetched."""
        with self._lock:
            current = self._current
            if current is None or current.step != step or current.complete:
                return
            if not 0 <= index < len(current.buckets):
                raise ValueError(f"step {step} has {len(current.buckets)} buckets, not bucket {index}")
            current.buckets[index] = [(name, array) for name, array, _ in tensors]
        self._wake()

    def hold(self, fetched: FetchedStep) -> None:
        """Serve ``fetched`` whole (verified; its arrays stay valid until the next :meth:`begin_fetch`)."""
        announced = fetched.announced
        by_name = {name: array for name, array, _ in fetched.tensors}
        buckets: list[list[tuple[str, np.ndarray]] | None] = [[] for _ in range(announced.num_buckets)]
        for meta in announced.manifest:
            buckets[meta.bucket].append((meta.name, by_name[meta.name]))  # type: ignore[union-attr]
        with self._lock:
            self._current, self._failed = RelayedStep(announced, buckets, complete=True), None
        self._wake()

    def fetch_failed(self) -> None:
        """The fetch under way failed: nothing of it is served, requests parked for it are refused
        (a step held whole stays served: its buffers were not written)."""
        with self._lock:
            if self._current is not None and not self._current.complete:
                self._failed, self._current = self._current.step, None
        self._wake()

    def held_step(self) -> int | None:
        """The step held whole (None while fetching)."""
        with self._lock:
            current = self._current
        return current.step if current is not None and current.complete else None

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"!")
        except (BlockingIOError, OSError):
            pass  # full of wake-ups already, or stopped

    # ----------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            router = self.bus.bind(zmq.ROUTER, self._bind_address, RELAY_ROLE)
        except Exception as exc:  # noqa: BLE001 - start() raises it on the caller's thread
            self._bind_error = exc
            self._ready.set()
            return
        self.bus.answer_rejected(router, lambda identity, error: self._refuse_unreadable(router, identity, error))
        self.address = router.address
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(50))  # wakes regularly to see stop() and parked deadlines
            if self._wake_read in events:
                os.read(self._wake_read, 4096)
            if router in events:
                self._drain(router)
            self._answer_parked(router)
        router.close(linger=0)

    def _drain(self, router: zmq.Socket) -> None:
        for _ in range(256):  # bounded: parked requests get their turn too
            received = self.bus.recv_before(router, time.monotonic(), (WeightsQuery, WeightsFetch))
            if received is None:
                return
            identity, request = received
            if isinstance(request, WeightsQuery):
                self._send(router, identity, self._answer_query(request))
                continue
            reply = self._answer_fetch(request)
            if reply is None and len(self._parked) < MAX_PARKED:
                self._parked.append(Parked(identity, request, time.monotonic() + self.wait_s))
            else:
                self._send(router, identity, reply or refused(f"{MAX_PARKED} requests wait already"))

    def _answer_parked(self, router: zmq.Socket) -> None:
        now, waiting = time.monotonic(), []
        for parked in self._parked:
            reply = self._answer_fetch(parked.request)
            if reply is None and parked.deadline <= now:
                reply = refused(f"step {parked.request.step} did not arrive within {self.wait_s:g}s")
            if reply is None:
                waiting.append(parked)
            else:
                self._send(router, parked.identity, reply)
        self._parked = waiting

    def _answer_query(self, request: WeightsQuery) -> WeightsAnnounced | Refused:
        """Which step this relay holds: also how a peer learns it is reachable before it waits."""
        with self._lock:
            current = self._current
        if current is not None and current.complete and request.adapter == FULL_WEIGHTS:
            return current.announced
        what = f"is fetching step {current.step}" if current is not None else "holds no step"
        return Refused(request="WeightsQuery", reason=f"this relay {what}")

    def _answer_fetch(self, request: WeightsFetch) -> WeightsBucket | Refused | None:
        """The bucket, a refusal, or None: park it (a bucket not verified yet of the step being
        fetched, or a step newer than the relay's and not superseded)."""
        if request.adapter != FULL_WEIGHTS:
            return refused(f"a relay serves the full weights only, not adapter {request.adapter[:80]!r}")
        with self._lock:
            current, failed = self._current, self._failed
            step = current.step if current is not None else None
            tensors = None
            if current is not None and request.step == step and 0 <= request.bucket < len(current.buckets):
                tensors = current.buckets[request.bucket]
        if current is not None and request.step == step:
            if not 0 <= request.bucket < len(current.buckets):
                return refused(f"step {request.step} has no bucket {request.bucket}")
            return None if tensors is None else self._bucket(request, tensors)
        newest = max((known for known in (step, failed) if known is not None), default=None)
        if newest is None or request.step > newest:
            return None  # not heard of yet: the relay is about to fetch it
        holds = step if current is not None and current.complete else None
        fetching = step if current is not None and not current.complete else None
        return refused(f"step {request.step} is not held (holds {holds}, fetching {fetching}, failed {failed})")

    def _bucket(self, request: WeightsFetch, tensors: list[tuple[str, np.ndarray]]) -> WeightsBucket:
        return chunked_bucket(request.step, request.bucket, request.nonce, [name for name, _ in tensors],
                              [array for _, array in tensors], self.chunk_bytes)  # fmt: skip

    def _send(self, router: zmq.Socket, identity: bytes, reply: WeightsAnnounced | WeightsBucket | Refused) -> None:
        try:
            self.bus.send(router, reply, identity)
        except PeerUnreachable as exc:  # gone, or not reading: the thread serves the others
            logger.warning("weight relay: {} not sent: {}", type(reply).__name__, exc)
            return
        if isinstance(reply, WeightsBucket):
            self.buckets_served += 1
            self.bytes_served += sum(piece.nbytes for piece in reply.tensors)
        elif isinstance(reply, Refused):
            self.num_refused += 1

    def _refuse_unreadable(self, router: zmq.Socket, identity: bytes | None, error: DecodeError) -> None:
        if identity is not None:
            self._send(router, identity, Refused(request="unknown", reason=f"unreadable request ({error.reason})"))


def refused(reason: str) -> Refused:
    return Refused(request="WeightsFetch", reason=f"weight relay: {reason}")


# ------------------------------------------------------------------ the peer side


@dataclass(frozen=True)
class WeightSources:
    """Where a replica takes a step from: ``upstream`` relays in order, then the trainer."""

    trainer: str
    upstream: tuple[str, ...] = ()
    answer_timeout_s: float = 2.0
    """How long an upstream relay has to answer at all (unreachable: the trainer at once)."""
    wait_s: float = 30.0
    """How long an upstream relay may hold a request for a step it is still fetching."""


def fetch_from_sources(bus_config: BusConfig, announced: WeightsAnnounced, replica_id: str, sources: WeightSources,
                       base: HeldStep | None = None, staging: Staging | None = None, window: int | None = None,
                       relay: WeightRelay | None = None) -> FetchedStep:  # fmt: skip
    """Step ``announced``, verified against its manifest, from the first upstream relay that
    delivers it whole, else from the trainer. Each source gets a Bus of its own, so no late reply
    of an abandoned source is ever read as another's. With ``relay`` (serving ``staging``'s buffers),
    each bucket is relayed to peers as soon as it is verified, the whole step once fetched."""
    extra: dict = {} if window is None else {"window": window}
    if relay is not None and announced.lora is None:
        extra["on_bucket"] = partial(relay.bucket_ready, announced.step)
    else:
        relay = None
    try:
        fetched = _from_first_source(bus_config, announced, replica_id, sources, base, staging, extra, relay)
    except BaseException:
        if relay is not None:
            relay.fetch_failed()
        raise
    if relay is not None:
        relay.hold(fetched)
    return fetched


def _from_first_source(bus_config: BusConfig, announced: WeightsAnnounced, replica_id: str, sources: WeightSources,
                       base: HeldStep | None, staging: Staging | None, extra: dict,
                       relay: WeightRelay | None) -> FetchedStep:  # fmt: skip
    if announced.lora is None:
        for address in sources.upstream:
            if relay is not None:
                relay.begin_fetch(announced)  # forget buckets of a source that failed: rewritten now
            try:
                fetched = _from_relay(bus_config, announced, replica_id, address, sources, base, staging, extra)
            except BusError as exc:  # timeouts, refusals and corrupt buckets alike
                logger.warning("step {} from relay {} failed, trying the next source: {}", announced.step, address, exc)
                continue
            fetched.source, fetched.relay_bytes = address, fetched.wire_bytes
            return fetched
    if relay is not None:
        relay.begin_fetch(announced)
    with Bus(bus_config) as bus:
        sock = bus.connect(zmq.DEALER, sources.trainer, "weights")
        fetched = fetch_weights(bus, sock, announced, replica_id, bus_config.request_timeout_s, retries=2,
                                base=base, staging=staging, **extra)  # fmt: skip
    fetched.source, fetched.trainer_bytes = sources.trainer, fetched.wire_bytes
    return fetched


def _from_relay(bus_config: BusConfig, announced: WeightsAnnounced, replica_id: str, address: str,
                sources: WeightSources, base: HeldStep | None, staging: Staging | None, extra: dict) -> FetchedStep:  # fmt: skip
    with Bus(bus_config.model_copy(update={"linger_ms": 0})) as bus:
        sock = bus.connect(zmq.DEALER, address, "weights")
        # Any answer proves the relay is there; only then is a wait for a step it is fetching worth it.
        bus.request(sock, WeightsQuery(replica_id=replica_id), (WeightsAnnounced, Refused),
                    sources.answer_timeout_s, what="answer from the weight relay")  # fmt: skip
        try:
            return fetch_weights(bus, sock, announced, replica_id, sources.wait_s + sources.answer_timeout_s,
                                 retries=0, base=base, staging=staging, **extra)  # fmt: skip
        except WeightsCorrupt as exc:
            raise WeightsCorrupt(f"relay {address}: {exc}") from exc
