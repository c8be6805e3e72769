"""Weight transfer from the trainer to inference replicas, numpy only.

The trainer keeps the latest published step in a :class:`WeightStore` (the
domain part, no sockets) and serves it through a :class:`WeightServer`
thread: an XPUB announces each new step, a ROUTER answers ``WeightsQuery``
(which step is latest: late joiners ask) and ``WeightsFetch`` (one bucket).
Replicas pull a step with :func:`rlbus.weights_fetch.fetch_step`, several buckets
in flight, which checks the xxh3 checksum of every tensor and raises before
anything is loaded, so a failed or corrupt transfer leaves the old weights serving.

Delta mode (``WeightStore(delta=True)``): the store also keeps the step before,
and a fetch that names the step the replica holds (``WeightsFetch.base_step``)
gets each tensor as a compressed XOR against it when that is smaller
(:mod:`rlbus.weight_codec`); a base it no longer holds gets full tensors.

Steps are kept per adapter (``lora.name``; "" for the full weights): runs sharing one trainer
each publish their own adapter with their own step numbers, so every query, fetch and
``keep_steps`` limit names the adapter, and step 3 of run ``a`` never answers for run ``b``'s.

Torch lives at the service edges: the trainer hands numpy arrays in, the
inference worker turns them back into tensors (``bfloat16`` travels as uint16
bits and is named in ``TensorMeta.dtype``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import zmq
from loguru import logger

from rlbus.bus import Bus, BusError, PeerUnreachable
from rlbus.messages import (
    LoraAdapterMeta,
    Refused,
    TensorMeta,
    WeightsAnnounced,
    WeightsBucket,
    WeightsFetch,
    WeightsQuery,
)
from rlbus.pubsub import Publisher
from rlbus.weight_codec import RAW, XOR_ZSTD, NamedArray, WeightsCorrupt, checksum, encode_delta
from rlbus.weights_fetch import (
    FULL_WEIGHTS,
    FetchedStep,
    HeldStep,
    ReplicaTransfer,
    Staging,
    adapter_of,
    adapter_problem,
    fetch_step,
    fetch_weights,
    query_latest,
)

__all__ = [
    "FULL_WEIGHTS", "FetchedStep", "HeldStep", "NamedArray", "PublishBuffers", "ReplicaTransfer", "Staging",
    "WeightServer", "WeightStore", "WeightsCorrupt", "adapter_of", "adapter_problem", "checksum", "fetch_step",
    "fetch_weights", "query_latest",
]  # fmt: skip

Bucket = list[tuple[str, np.ndarray]]
CHUNK_BYTES = 1 << 20
"""Largest frame a tensor travels in. Frames of this size come out of memory the receiver already
uses (fresh 64 MiB frames halved loopback throughput here: every 4 KiB of them was a page fault)."""


@dataclass
class StoredStep:
    announced: WeightsAnnounced
    buckets: list[Bucket]
    by_name: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class EncodedBucket:
    """One bucket of a step as deltas against a base step (raw where a delta is not smaller)."""

    names: list[str]
    tensors: list[np.ndarray]
    encodings: list[str]


class PublishBuffers:
    """Host arrays a trainer copies each step's weights into, reused in turn instead of fresh memory
    every step (faulting fresh pages in cost as much as the copy itself).

    One set per step the store holds plus the one being written: a set is written again only
    after the store dropped its step. A frame of it still queued for a replica that many steps
    behind would then arrive changed and fail its checksum: refused, never loaded."""

    def __init__(self, num_sets: int) -> None:
        if num_sets < 2:
            raise ValueError(f"num_sets must be at least 2 (one served, one written), got {num_sets}")
        self._sets: list[dict[str, np.ndarray]] = [{} for _ in range(num_sets)]
        self._turn = 0

    def begin_step(self) -> None:
        """Move on to the next set: the oldest one, whose step the store no longer holds."""
        self._turn = (self._turn + 1) % len(self._sets)

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """This step's buffer for ``name``: last time's when shape and dtype match, else a new one."""
        current = self._sets[self._turn]
        array = current.get(name)
        if array is None or array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            array = current[name] = np.empty(shape, dtype=dtype)
        return array


class WeightStore:
    """The steps a trainer can serve, split into buckets of about ``bucket_bytes``, kept per adapter
    (``keep_steps`` of each: one run's publications never push out another's).

    ``delta``: keep at least the step before the latest too, and answer fetches that name it as
    their base with deltas (encoded once per bucket, shared by every replica that asks); a base is
    always a step of the same adapter."""

    def __init__(self, bucket_bytes: int, keep_steps: int = 1, delta: bool = False,
                 chunk_bytes: int = CHUNK_BYTES) -> None:  # fmt: skip
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.bucket_bytes = bucket_bytes
        self.chunk_bytes = chunk_bytes
        self.delta = delta
        self.keep_steps = max(keep_steps, 2) if delta else keep_steps
        self._steps: dict[str, dict[int, StoredStep]] = {}
        """Adapter ("" for the full weights) -> step -> what it serves."""
        self._encoded: dict[tuple[str, int, int, int], EncodedBucket] = {}
        """(adapter, step, base step, bucket) -> its deltas."""
        self._lock = threading.Lock()

    def add(self, step: int, tensors: Iterable[NamedArray], lora: LoraAdapterMeta | None = None,
            broadcast_group: str = "") -> WeightsAnnounced:  # fmt: skip
        """Store ``step`` (arrays are kept by reference) and return its announcement; ``lora``: the
        tensors are that adapter's, not the full weights, and ``step`` is counted among its steps;
        ``broadcast_group``: the collective group the step is also broadcast in (``WeightsAnnounced``)."""
        manifest: list[TensorMeta] = []
        buckets: list[Bucket] = [[]]
        bucket_fill = 0
        for name, array, dtype in tensors:
            array = np.ascontiguousarray(array)
            if buckets[-1] and bucket_fill + array.nbytes > self.bucket_bytes:
                buckets.append([])
                bucket_fill = 0
            buckets[-1].append((name, array))
            bucket_fill += array.nbytes
            manifest.append(
                TensorMeta(
                    name=name,
                    dtype=dtype,
                    shape=list(array.shape),
                    nbytes=array.nbytes,
                    bucket=len(buckets) - 1,
                    checksum=checksum(array),
                )
            )
        announced = WeightsAnnounced(
            step=step,
            manifest=manifest,
            num_buckets=len(buckets),
            total_bytes=sum(m.nbytes for m in manifest),
            published_at=time.time(),
            delta=self.delta,
            lora=lora,
            broadcast_group=broadcast_group,
        )
        by_name = {name: array for bucket in buckets for name, array in bucket} if self.delta else {}
        adapter = adapter_of(announced)
        with self._lock:
            steps = self._steps.setdefault(adapter, {})
            steps[step] = StoredStep(announced, buckets, by_name)
            for old in sorted(steps)[: -self.keep_steps]:
                del steps[old]
            self._encoded = {key: value for key, value in self._encoded.items()
                             if key[0] != adapter or (key[1] in steps and key[2] in steps)}  # fmt: skip
        return announced

    def latest(self, adapter: str = FULL_WEIGHTS) -> WeightsAnnounced | None:
        """The highest step held of ``adapter`` ("": the full weights), None when none is."""
        with self._lock:
            steps = self._steps.get(adapter)
            return steps[max(steps)].announced if steps else None

    def bucket(self, step: int, index: int, nonce: int = 0, base_step: int | None = None,
               adapter: str = FULL_WEIGHTS) -> WeightsBucket | Refused:  # fmt: skip
        """Bucket ``index`` of ``adapter``'s ``step``; as deltas against ``base_step`` (of the same
        adapter) when in delta mode and that step is held, else in full."""
        with self._lock:
            steps = self._steps.get(adapter, {})
            stored, held = steps.get(step), sorted(steps)
            base = steps.get(base_step) if self.delta and base_step is not None and base_step != step else None
        if stored is None:
            return Refused(request="WeightsFetch", reason=f"step {step}{whose(adapter)} is not held (have {held})")
        if not 0 <= index < len(stored.buckets):
            return Refused(request="WeightsFetch", reason=f"step {step}{whose(adapter)} has no bucket {index}")
        if base is not None:
            encoded = self._encoded_bucket(stored, base, index)
        else:
            encoded = EncodedBucket([name for name, _ in stored.buckets[index]],
                                    [array for _, array in stored.buckets[index]], [])  # fmt: skip
        return chunked_bucket(step, index, nonce, encoded.names, encoded.tensors, self.chunk_bytes,
                              base.announced.step if base is not None else None, encoded.encodings)  # fmt: skip

    def _encoded_bucket(self, stored: StoredStep, base: StoredStep, index: int) -> EncodedBucket:
        adapter = adapter_of(stored.announced)
        key = (adapter, stored.announced.step, base.announced.step, index)
        with self._lock:
            cached = self._encoded.get(key)
        if cached is not None:
            return cached
        encoded = EncodedBucket([], [], [])
        for name, array in stored.buckets[index]:
            base_array = base.by_name.get(name)
            delta = encode_delta(array, base_array) if base_array is not None else None
            encoded.names.append(name)
            encoded.tensors.append(array if delta is None else delta)
            encoded.encodings.append(RAW if delta is None else XOR_ZSTD)
        with self._lock:
            steps = self._steps.get(adapter, {})
            if stored.announced.step in steps and base.announced.step in steps:
                self._encoded[key] = encoded
        return encoded


def chunked_bucket(step: int, index: int, nonce: int, names: list[str], arrays: list[np.ndarray], chunk_bytes: int,
                   base_step: int | None = None, encodings: list[str] | None = None) -> WeightsBucket:  # fmt: skip
    """Bucket ``index`` of ``step`` holding ``arrays``, each cut into frames of at most ``chunk_bytes``
    (``chunks`` says how many each took; empty when every array fits one frame)."""
    pieces = [chunked(array, chunk_bytes) for array in arrays]
    return WeightsBucket(step=step, bucket=index, names=names, nonce=nonce,
                         tensors=[piece for chunks in pieces for piece in chunks],
                         chunks=[len(chunks) for chunks in pieces] if any(len(c) > 1 for c in pieces) else [],
                         base_step=base_step, encodings=encodings or [])  # fmt: skip


def chunked(array: np.ndarray, chunk_bytes: int) -> list[np.ndarray]:
    """``array`` whole when it fits a chunk, else 1-D views of its flattened elements, in order."""
    if array.nbytes <= chunk_bytes or array.ndim == 0:
        return [array]
    flat = array.reshape(-1)
    step = max(1, chunk_bytes // array.itemsize)
    return [flat[start : start + step] for start in range(0, flat.size, step)]


def whose(adapter: str) -> str:
    """`` of adapter 'x'`` for an adapter's steps, nothing for the full weights (messages read as before)."""
    return f" of adapter {adapter!r}" if adapter else ""


class WeightServer:
    """Serves a :class:`WeightStore` from a background thread that owns both sockets."""

    def __init__(
        self, bus: Bus, fetch_address: str, announce_address: str, store: WeightStore, sender: str = "trainer"
    ) -> None:
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
        self.bytes_served = 0
        """Tensor bytes sent in buckets (deltas at their size): the trainer's upload, for benches and logs."""
        self._served: dict[tuple[str, int], set[int]] = {}
        """(adapter, step) -> its buckets served at least once (recent steps of each adapter only)."""
        self._last_adapter = FULL_WEIGHTS
        """The adapter of the step published last: whose step ``wait_fetched`` means by default."""
        self._served_changed = threading.Condition()
        self.fetch_address = self.announce_address = ""
        # publish() writes a byte here so the thread announces at once, not at its next wake-up.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    def start(self, timeout_s: float = 10.0) -> WeightServer:
        """Bind both sockets on the thread; raises what the bind raised (e.g. port in use)."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise BusError(f"weight server did not bind {self._fetch_address} within {timeout_s:g}s")
        if self._bind_error is not None:
            raise BusError(
                f"weight server could not bind {self._fetch_address} (fetch) and "
                f"{self._announce_address} (announce): {self._bind_error}"
            ) from self._bind_error
        return self

    def publish(self, step: int, tensors: Iterable[NamedArray], lora: LoraAdapterMeta | None = None,
                broadcast_group: str = "") -> WeightsAnnounced:  # fmt: skip
        """Store ``step`` and announce it; replicas fetch it from then on (``lora``, ``broadcast_group``:
        see :meth:`WeightStore.add`)."""
        announced = self.store.add(step, tensors, lora, broadcast_group)
        with self._lock:
            self._pending.append(announced)
            self._last_adapter = adapter_of(announced)
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the thread is bound to wake
        return announced

    def wait_fetched(self, step: int, timeout_s: float, adapter: str | None = None) -> bool:
        """Block until every bucket of ``adapter``'s ``step`` (its latest) was served at least once (a
        replica holds it), or ``timeout_s`` passed; True when it was. ``adapter`` None: the adapter
        of the step published last, so a single-run trainer (full weights or one adapter) need not
        name it; a trainer serving several runs names each."""
        if adapter is None:
            with self._lock:
                adapter = self._last_adapter
        announced = self.store.latest(adapter)
        if announced is None or announced.step != step:
            return False
        key = (adapter, step)
        with self._served_changed:
            return self._served_changed.wait_for(
                lambda: len(self._served.get(key, ())) >= announced.num_buckets, timeout_s
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _record_served(self, adapter: str, bucket: WeightsBucket) -> None:
        self.num_buckets_served += 1
        self.bytes_served += sum(piece.nbytes for piece in bucket.tensors)
        with self._served_changed:
            self._served.setdefault((adapter, bucket.step), set()).add(bucket.bucket)
            for old in [key for key in self._served if key[0] == adapter and key[1] < bucket.step - 2]:
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
        poller.register(self._wake_read, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(50))  # wakes regularly to see stop()
            if self._wake_read in events:
                os.read(self._wake_read, 4096)
            if publisher.sock in events:
                publisher.pump()
            if router in events:
                self._answer(router)
            with self._lock:
                pending, self._pending = self._pending, []
            for announced in pending:
                publisher.publish(announced)
                logger.info("announced weights of step {}{} ({:.1f} MB)", announced.step,
                            whose(adapter_of(announced)), announced.total_bytes / 1e6)  # fmt: skip
        # zmq sockets belong to the thread that uses them: close them here, not in stop().
        router.close()
        publisher.sock.close()

    def _answer(self, router: zmq.Socket) -> None:
        received = self.bus.recv_before(router, time.monotonic(), (WeightsQuery, WeightsFetch))
        if received is None:
            return
        identity, request = received
        reply = self._reply_to(request)
        try:
            self.bus.send(router, reply, identity)
        except PeerUnreachable as exc:  # gone, or not reading: the thread serves the others
            logger.warning("weights: {} not sent: {}", type(reply).__name__, exc)

    def _reply_to(self, request: WeightsQuery | WeightsFetch) -> WeightsAnnounced | WeightsBucket | Refused:
        """The answer to ``request``; a Refused (never an exception: this thread serves everyone)
        for an adapter name that cannot be one, a step not held or one not published yet."""
        name = type(request).__name__
        problem = adapter_problem(request.adapter)
        if problem:
            return Refused(request=name, reason=problem)
        if isinstance(request, WeightsQuery):
            latest = self.store.latest(request.adapter)
            return latest or Refused(request=name, reason=f"no step{whose(request.adapter)} published yet")
        reply = self.store.bucket(request.step, request.bucket, request.nonce, request.base_step, request.adapter)
        if isinstance(reply, WeightsBucket):
            self._record_served(request.adapter, reply)
        return reply
