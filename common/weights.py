"""Weight transfer from the trainer to inference replicas, numpy only.

The trainer keeps the latest published step in a :class:`WeightStore` (the
domain part, no sockets) and serves it through a :class:`WeightServer`
thread: an XPUB announces each new step, a ROUTER answers ``WeightsQuery``
(which step is latest: late joiners ask) and ``WeightsFetch`` (one bucket).
Replicas pull a step bucket by bucket with :func:`fetch_step`, which checks
the CRC32 of every tensor and raises before anything is loaded, so a failed or
corrupt transfer leaves the old weights serving. Each ``WeightsFetch`` carries a
random nonce that the ``WeightsBucket`` echoes: a late reply to a request that
was resent is skipped, never read as the next bucket.

Torch lives at the service edges: the trainer hands numpy arrays in, the
inference worker turns them back into tensors (``bfloat16`` travels as uint16
bits and is named in ``TensorMeta.dtype``).
"""

from __future__ import annotations

import secrets
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import zmq
from loguru import logger

from rlbus.bus import Bus, BusError, PeerUnreachable
from rlbus.messages import Refused, TensorMeta, WeightsAnnounced, WeightsBucket, WeightsFetch, WeightsQuery
from rlbus.pubsub import Publisher

NamedArray = tuple[str, np.ndarray, str]
"""(parameter name, array, logical dtype such as ``float32`` or ``bfloat16``)."""


class WeightsCorrupt(BusError):
    """A fetched step did not match its manifest; nothing of it may be loaded."""


def checksum(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


@dataclass
class StoredStep:
    announced: WeightsAnnounced
    buckets: list[list[tuple[str, np.ndarray]]]


class WeightStore:
    """The steps a trainer can serve, split into buckets of about ``bucket_bytes``."""

    def __init__(self, bucket_bytes: int, keep_steps: int = 1) -> None:
        self.bucket_bytes = bucket_bytes
        self.keep_steps = keep_steps
        self._steps: dict[int, StoredStep] = {}
        self._lock = threading.Lock()

    def add(self, step: int, tensors: Iterable[NamedArray]) -> WeightsAnnounced:
        """Store ``step`` (arrays are kept by reference) and return its announcement."""
        manifest: list[TensorMeta] = []
        buckets: list[list[tuple[str, np.ndarray]]] = [[]]
        bucket_fill = 0
        for name, array, dtype in tensors:
            array = np.ascontiguousarray(array)
            if buckets[-1] and bucket_fill + array.nbytes > self.bucket_bytes:
                buckets.append([])
                bucket_fill = 0
            buckets[-1].append((name, array))
            bucket_fill += array.nbytes
            manifest.append(TensorMeta(name=name, dtype=dtype, shape=list(array.shape), nbytes=array.nbytes,
                                       bucket=len(buckets) - 1, checksum=checksum(array)))
        announced = WeightsAnnounced(step=step, manifest=manifest, num_buckets=len(buckets),
                                     total_bytes=sum(m.nbytes for m in manifest), published_at=time.time())
        with self._lock:
            self._steps[step] = StoredStep(announced, buckets)
            for old in sorted(self._steps)[: -self.keep_steps]:
                del self._steps[old]
        return announced

    def latest(self) -> WeightsAnnounced | None:
        with self._lock:
            return self._steps[max(self._steps)].announced if self._steps else None

    def bucket(self, step: int, index: int, nonce: int = 0) -> WeightsBucket | Refused:
        with self._lock:
            stored = self._steps.get(step)
        if stored is None:
            return Refused(request="WeightsFetch", reason=f"step {step} is not held (have {sorted(self._steps)})")
        if not 0 <= index < len(stored.buckets):
            return Refused(request="WeightsFetch", reason=f"step {step} has no bucket {index}")
        names, arrays = zip(*stored.buckets[index], strict=True) if stored.buckets[index] else ((), ())
        return WeightsBucket(step=step, bucket=index, names=list(names), tensors=list(arrays), nonce=nonce)


class WeightServer:
    """Serves a :class:`WeightStore` from a background thread that owns both sockets."""

    def __init__(self, bus: Bus, fetch_address: str, announce_address: str, store: WeightStore,
                 sender: str = "trainer") -> None:
        self.bus = bus
        self.store = store
        self._fetch_address, self._announce_address, self._sender = fetch_address, announce_address, sender
        self._pending: list[WeightsAnnounced] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._bind_error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="weight-server", daemon=True)
        self.num_buckets_served = 0
        self._served: dict[int, set[int]] = {}
        """Step -> its buckets served at least once (recent steps only)."""
        self._served_changed = threading.Condition()
        self.fetch_address = self.announce_address = ""

    def start(self, timeout_s: float = 10.0) -> WeightServer:
        """Bind both sockets on the thread; raises what the bind raised (e.g. port in use)."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise BusError(f"weight server did not bind {self._fetch_address} within {timeout_s:g}s")
        if self._bind_error is not None:
            raise BusError(f"weight server could not bind {self._fetch_address} (fetch) and "
                           f"{self._announce_address} (announce): {self._bind_error}") from self._bind_error
        return self

    def publish(self, step: int, tensors: Iterable[NamedArray]) -> WeightsAnnounced:
        """Store ``step`` and announce it; replicas fetch it from then on."""
        announced = self.store.add(step, tensors)
        with self._lock:
            self._pending.append(announced)
        return announced

    def wait_fetched(self, step: int, timeout_s: float) -> bool:
        """Block until every bucket of ``step`` was served at least once (a replica holds it), or
        ``timeout_s`` passed; True when it was."""
        announced = self.store.latest()
        if announced is None or announced.step != step:
            return False
        with self._served_changed:
            return self._served_changed.wait_for(
                lambda: len(self._served.get(step, ())) >= announced.num_buckets, timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _record_served(self, bucket: WeightsBucket) -> None:
        self.num_buckets_served += 1
        with self._served_changed:
            self._served.setdefault(bucket.step, set()).add(bucket.bucket)
            for old in [s for s in self._served if s < bucket.step - 2]:
                del self._served[old]
            self._served_changed.notify_all()

    def _run(self) -> None:
        try:
            router = self.bus.bind(zmq.ROUTER, self._fetch_address, "weights")
            publisher = Publisher(self.bus, self._announce_address, self._sender, role="announce")
        except Exception as exc:  # noqa: BLE001 - start() raises it again on the caller's thread
            self._bind_error = exc
            self._ready.set()
            return
        self.fetch_address, self.announce_address = router.address, publisher.address
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(publisher.sock, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(50))  # wakes regularly to announce steps published meanwhile
            if publisher.sock in events:
                publisher.pump()
            if router in events:
                self._answer(router)
            with self._lock:
                pending, self._pending = self._pending, []
            for announced in pending:
                publisher.publish(announced)
                logger.info("announced weights of step {} ({:.1f} MB)", announced.step, announced.total_bytes / 1e6)
        # zmq sockets belong to the thread that uses them: close them here, not in stop().
        router.close()
        publisher.sock.close()

    def _answer(self, router: zmq.Socket) -> None:
        received = self.bus.recv_before(router, time.monotonic(), (WeightsQuery, WeightsFetch))
        if received is None:
            return
        identity, request = received
        if isinstance(request, WeightsQuery):
            reply = self.store.latest() or Refused(request="WeightsQuery", reason="no step published yet")
        else:
            reply = self.store.bucket(request.step, request.bucket, request.nonce)
            if isinstance(reply, WeightsBucket):
                self._record_served(reply)
        try:
            self.bus.send(router, reply, identity)
        except PeerUnreachable as exc:  # gone, or not reading: the thread serves the others
            logger.warning("weights: {} not sent: {}", type(reply).__name__, exc)


def query_latest(bus: Bus, sock: zmq.Socket, replica_id: str, timeout_s: float) -> WeightsAnnounced | None:
    """The trainer's latest step, or None if it has published nothing yet."""
    reply = bus.request(sock, WeightsQuery(replica_id=replica_id), (WeightsAnnounced, Refused), timeout_s,
                        what="answer to WeightsQuery")
    return reply if isinstance(reply, WeightsAnnounced) else None


def fetch_step(bus: Bus, sock: zmq.Socket, announced: WeightsAnnounced, replica_id: str,
               timeout_s: float, retries: int = 2) -> list[NamedArray]:
    """Every tensor of ``announced``, checked against the manifest; raises WeightsCorrupt otherwise."""
    by_name = {meta.name: meta for meta in announced.manifest}
    tensors: list[NamedArray] = []
    for index in range(announced.num_buckets):
        request = WeightsFetch(replica_id=replica_id, step=announced.step, bucket=index,
                               nonce=secrets.randbelow(2**63 - 1) + 1)  # fmt: skip
        reply = _fetch_bucket(bus, sock, request, timeout_s, retries)
        for name, array in zip(reply.names, reply.tensors, strict=True):
            tensors.append((name, array, _verified(by_name, name, array, announced.step).dtype))
    missing = set(by_name) - {name for name, _, _ in tensors}
    if missing:
        raise WeightsCorrupt(f"step {announced.step}: {len(missing)} tensor(s) never arrived, e.g. {min(missing)}")
    return tensors


def _fetch_bucket(bus: Bus, sock: zmq.Socket, request: WeightsFetch, timeout_s: float, retries: int) -> WeightsBucket:
    """The reply to ``request``, resent up to ``retries`` times after ``timeout_s`` each. Replies
    to other requests (a slow answer to a request resent before) are skipped, not taken for this one."""
    what = f"bucket {request.bucket} of step {request.step}"
    for attempt in range(1, retries + 2):
        bus.send(sock, request)
        deadline = time.monotonic() + timeout_s
        while (reply := bus.recv_before(sock, deadline, (WeightsBucket, Refused))) is not None:
            # A refusal carries no nonce; "step not held" holds for every request of that step.
            if isinstance(reply, Refused):
                raise WeightsCorrupt(f"trainer refused {what}: {reply.reason}")
            asked = (reply.step, reply.bucket) == (request.step, request.bucket)
            # Nonce 0: a trainer that does not echo nonces; its replies are matched by bucket only.
            if reply.nonce == request.nonce or (reply.nonce == 0 and asked):
                if not asked:
                    raise WeightsCorrupt(f"asked for {what}, got bucket {reply.bucket} of step {reply.step}")
                return reply
            logger.info("skipped a late reply (bucket {} of step {}) while waiting for {}", reply.bucket, reply.step,
                        what)  # fmt: skip
        logger.warning("no {} on {} after attempt {}/{}", what, sock.address, attempt, retries + 1)
    raise bus.timeout(sock, f"{what} after {retries + 1} attempt(s)", timeout_s)


def _verified(by_name: dict[str, TensorMeta], name: str, array: np.ndarray, step: int) -> TensorMeta:
    meta = by_name.get(name)
    if meta is None:
        raise WeightsCorrupt(f"step {step}: tensor {name} is not in the manifest")
    if list(array.shape) != meta.shape or array.nbytes != meta.nbytes:
        raise WeightsCorrupt(f"step {step}: tensor {name} has shape {list(array.shape)}, manifest says {meta.shape}")
    if checksum(array) != meta.checksum:
        raise WeightsCorrupt(f"step {step}: checksum mismatch on tensor {name}")
    return meta
