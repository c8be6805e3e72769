"""The replica side of weight transfer: pull a step from the trainer's WeightServer, verified.

:func:`fetch_weights` keeps up to ``window`` bucket requests in flight on one DEALER, so
the trainer's sends, the wire and this side's checks overlap instead of taking turns (one
request per bucket waited a round trip and a whole bucket's check each time). Replies come
back in any order and are matched by the nonce each ``WeightsFetch`` carries: a late reply to a
request that was resent is skipped, never read as another bucket. Every tensor is checked
against the manifest (bucket, shape, size, xxh3 checksum) as its bucket arrives, and the step
is returned only when all of them arrived and passed: a corrupt or partial transfer raises
:class:`WeightsCorrupt` and nothing of it may be loaded. Tensors are views of the received
frames (no copy), or, given a :class:`Staging`, copies in buffers the replica reuses from step
to step; deltas are decoded against the replica's :class:`HeldStep`.

Steps are named by adapter and number (one trainer may serve several runs' adapters, each
counting its own steps): a fetch asks for the announcement's adapter (``lora.name``), a query
names the adapter whose latest step it wants ("" for the full weights).
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq
from loguru import logger

from rlbus.bus import Bus
from rlbus.messages import (
    ADAPTER_NAME_PATTERN,
    Refused,
    TensorMeta,
    WeightsAnnounced,
    WeightsBucket,
    WeightsFetch,
    WeightsQuery,
)
from rlbus.weight_codec import RAW, XOR_ZSTD, NamedArray, WeightsCorrupt, checksum, decode_delta, hasher

DEFAULT_WINDOW = 4
"""Bucket requests in flight: enough to keep loopback busy while a bucket is checked."""

FULL_WEIGHTS = ""
"""The adapter name that stands for the full weights (steps whose ``lora`` is None)."""

BucketHook = Callable[[int, list[NamedArray]], None]
"""Told each bucket's index and tensors (manifest order) once every tensor of it passed its checks."""


def adapter_of(announced: WeightsAnnounced) -> str:
    """Whose step ``announced`` is: its adapter's name, or ``FULL_WEIGHTS``."""
    return announced.lora.name if announced.lora is not None else FULL_WEIGHTS


def adapter_problem(adapter: str) -> str:
    """Why ``adapter`` names no adapter's steps ("" when it does: a LoRA adapter name or ``FULL_WEIGHTS``)."""
    if adapter == FULL_WEIGHTS or re.fullmatch(ADAPTER_NAME_PATTERN, adapter):
        return ""
    shown = adapter if len(adapter) <= 80 else f"{adapter[:80]}... ({len(adapter)} characters)"
    return (f"adapter {shown!r} is not an adapter name (a letter or digit, then up to 63 letters, digits, "
            "'.', '_' or '-') nor \"\" (the full weights)")  # fmt: skip


@dataclass
class HeldStep:
    """The verified tensors of the step a replica holds: what deltas of the next step apply to."""

    step: int
    tensors: dict[str, np.ndarray]


class Staging:
    """Receive buffers a replica reuses from step to step, one per tensor name.

    Each piece of a tensor is copied into its buffer as it arrives, so received frames go back
    to the allocator at once and the tensor lies in memory that is already mapped (fresh memory
    per tensor costs a page fault every 4 KiB). Tensors fetched into a staging are views of it:
    valid until the next fetch into the same staging, which must not hold the delta base."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def buffer(self, name: str, nbytes: int) -> np.ndarray:
        """A uint8 buffer of ``nbytes`` for tensor ``name`` (the last one, when the size matches)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.nbytes != nbytes:
            buffer = self._buffers[name] = np.empty(nbytes, dtype=np.uint8)
        return buffer


@dataclass
class FetchedStep:
    """A verified step and what its transfer cost."""

    announced: WeightsAnnounced
    tensors: list[NamedArray]
    """In manifest order."""
    wire_bytes: int = 0
    """Tensor bytes received (deltas at their compressed size)."""
    num_delta_tensors: int = 0
    source: str = ""
    """The address the step came from (a peer's relay or the trainer; "" when not told)."""
    relay_bytes: int = 0
    """Of ``wire_bytes``, those a peer replica's relay sent (:mod:`rlbus.weights_relay`)."""
    trainer_bytes: int = 0
    """Of ``wire_bytes``, those the trainer sent, when the fetch went through ``fetch_from_sources``."""

    def held(self) -> HeldStep:
        return HeldStep(self.announced.step, {name: array for name, array, _ in self.tensors})


class ReplicaTransfer:
    """What a replica keeps from one fetch to the next: receive buffers and, when the trainer sends
    deltas, the step it loaded last (the base they apply to). The buffers are written again by a
    later fetch, so what loads them must copy (vLLM's ``load_weights`` copies into its parameters).
    After a failed fetch, :meth:`forget` the base: the retry then goes in full."""

    def __init__(self) -> None:
        self._stagings = [Staging(), Staging()]
        self._held: HeldStep | None = None
        self._held_in = self._writing = 0
        """Which staging holds the held step, and which the fetch under way writes."""

    def staging(self) -> Staging:
        # While a step is held, the other staging: a fetch never writes into the base it decodes against.
        self._writing = 1 - self._held_in if self._held is not None else 0
        return self._stagings[self._writing]

    def base(self, announced: WeightsAnnounced) -> HeldStep | None:
        return self._held if announced.delta else None

    def loaded(self, fetched: FetchedStep) -> None:
        self._held = fetched.held() if fetched.announced.delta else None
        self._held_in = self._writing
        if self._held is None:
            self._stagings[1] = Staging()  # free the second set of buffers while no delta needs it

    def forget(self) -> None:
        self._held = None


@dataclass
class _Request:
    message: WeightsFetch
    deadline: float
    attempt: int = 1


@dataclass
class _Transfer:
    """What one fetch has asked for and received so far."""

    announced: WeightsAnnounced
    base: HeldStep | None
    by_name: dict[str, TensorMeta]
    staging: Staging | None = None
    in_flight: dict[int, _Request] = field(default_factory=dict)
    """Nonce -> request."""
    received: dict[str, np.ndarray] = field(default_factory=dict)
    wire_bytes: int = 0
    num_delta_tensors: int = 0
    by_bucket: dict[int, list[TensorMeta]] = field(default_factory=dict)
    """Bucket index -> its tensors in manifest order."""

    def __post_init__(self) -> None:
        for meta in self.announced.manifest:
            self.by_bucket.setdefault(meta.bucket, []).append(meta)

    def bucket_tensors(self, index: int) -> list[NamedArray]:
        """Bucket ``index``'s tensors in manifest order; raises WeightsCorrupt if its reply lacked any."""
        metas = self.by_bucket.get(index, [])
        missing = [meta.name for meta in metas if meta.name not in self.received]
        if missing:
            raise WeightsCorrupt(f"step {self.announced.step}: bucket {index} lacks {len(missing)} tensor(s) of "
                                 f"the manifest, e.g. {missing[0]}")  # fmt: skip
        return [(meta.name, self.received[meta.name], meta.dtype) for meta in metas]


def query_latest(bus: Bus, sock: zmq.Socket, replica_id: str, timeout_s: float,
                 adapter: str = FULL_WEIGHTS) -> WeightsAnnounced | None:  # fmt: skip
    """The trainer's latest step of ``adapter`` ("": the full weights), or None if it has published
    none yet. Raises ValueError for a name that cannot be an adapter's."""
    problem = adapter_problem(adapter)
    if problem:
        raise ValueError(problem)
    query = WeightsQuery(replica_id=replica_id, adapter=adapter)
    reply = bus.request(sock, query, (WeightsAnnounced, Refused), timeout_s, what="answer to WeightsQuery")
    return reply if isinstance(reply, WeightsAnnounced) else None


def fetch_step(bus: Bus, sock: zmq.Socket, announced: WeightsAnnounced, replica_id: str, timeout_s: float,
               retries: int = 2, window: int = DEFAULT_WINDOW) -> list[NamedArray]:  # fmt: skip
    """Every tensor of ``announced``, checked against the manifest; raises WeightsCorrupt otherwise."""
    return fetch_weights(bus, sock, announced, replica_id, timeout_s, retries, window).tensors


def fetch_weights(bus: Bus, sock: zmq.Socket, announced: WeightsAnnounced, replica_id: str, timeout_s: float,
                  retries: int = 2, window: int = DEFAULT_WINDOW, base: HeldStep | None = None,
                  staging: Staging | None = None, on_bucket: BucketHook | None = None) -> FetchedStep:  # fmt: skip
    """Step ``announced``, verified, with up to ``window`` buckets in flight. Each request is resent
    up to ``retries`` times after ``timeout_s`` without its reply. With ``base`` (the step this
    replica holds), the trainer may send deltas against it; with ``staging``, tensors are copied
    into its buffers (see :class:`Staging`). ``on_bucket`` is told each bucket as soon as all of its
    tensors passed their checks (deltas already decoded: full tensors), e.g. to relay it to peers
    before the rest of the step arrived; its arrays are those the step returns."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    base = base if base is not None and base.step != announced.step else None
    transfer = _Transfer(announced, base, {meta.name: meta for meta in announced.manifest}, staging)
    to_ask = deque(range(announced.num_buckets))
    done: set[int] = set()
    while len(done) < announced.num_buckets:
        while to_ask and len(transfer.in_flight) < window:
            _send(bus, sock, transfer, _new_request(replica_id, announced, to_ask.popleft(), base, timeout_s))
        deadline = min(request.deadline for request in transfer.in_flight.values())
        reply = bus.recv_before(sock, deadline, (WeightsBucket, Refused))
        if reply is None:
            _resend_overdue(bus, sock, transfer, timeout_s, retries)
            continue
        request = _answered(transfer, reply)
        if request is not None:
            _check_bucket(transfer, reply, request.message.bucket)
            verified = transfer.bucket_tensors(request.message.bucket)
            done.add(request.message.bucket)
            if on_bucket is not None:
                on_bucket(request.message.bucket, verified)
            # Requests queued behind this one were waiting their turn, not lost: a timeout means
            # no progress for ``timeout_s``, not a slow link's time for ``window`` buckets.
            for waiting in transfer.in_flight.values():
                waiting.deadline = max(waiting.deadline, time.monotonic() + timeout_s)
    return _complete(transfer)


def _new_request(replica_id: str, announced: WeightsAnnounced, index: int, base: HeldStep | None,
                 timeout_s: float) -> _Request:  # fmt: skip
    message = WeightsFetch(replica_id=replica_id, step=announced.step, bucket=index, adapter=adapter_of(announced),
                           nonce=secrets.randbelow(2**63 - 1) + 1,
                           base_step=base.step if base is not None else None)  # fmt: skip
    return _Request(message, time.monotonic() + timeout_s)


def _send(bus: Bus, sock: zmq.Socket, transfer: _Transfer, request: _Request) -> None:
    bus.send(sock, request.message)
    transfer.in_flight[request.message.nonce] = request


def _resend_overdue(bus: Bus, sock: zmq.Socket, transfer: _Transfer, timeout_s: float, retries: int) -> None:
    now = time.monotonic()
    for request in [r for r in transfer.in_flight.values() if r.deadline <= now]:
        what = f"bucket {request.message.bucket} of step {request.message.step}"
        logger.warning("no {} on {} after attempt {}/{}", what, sock.address, request.attempt, retries + 1)
        if request.attempt > retries:
            raise bus.timeout(sock, f"{what} after {retries + 1} attempt(s)", timeout_s)
        request.attempt += 1
        request.deadline = now + timeout_s
        bus.send(sock, request.message)  # the same nonce: whichever copy of the reply comes first counts


def _answered(transfer: _Transfer, reply: WeightsBucket | Refused) -> _Request | None:
    """The in-flight request ``reply`` answers (now answered), or None for a late duplicate."""
    # A refusal carries no nonce; "step not held" holds for every request of that step.
    if isinstance(reply, Refused):
        step = transfer.announced.step
        buckets = sorted(r.message.bucket for r in transfer.in_flight.values())
        raise WeightsCorrupt(f"refused bucket {buckets[0] if buckets else '?'} of step {step}: {reply.reason}")
    request = transfer.in_flight.get(reply.nonce) if reply.nonce else None
    if request is None and reply.nonce == 0:
        # A trainer that does not echo nonces: its replies are matched by bucket only.
        request = next((r for r in transfer.in_flight.values() if r.message.bucket == reply.bucket
                        and r.message.step == reply.step), None)  # fmt: skip
    if request is None:
        logger.info("skipped a late reply (bucket {} of step {})", reply.bucket, reply.step)
        return None
    asked = request.message
    if (reply.step, reply.bucket) != (asked.step, asked.bucket):
        raise WeightsCorrupt(f"asked for bucket {asked.bucket} of step {asked.step}, got bucket {reply.bucket} "
                             f"of step {reply.step}")  # fmt: skip
    del transfer.in_flight[asked.nonce]
    return request


def _check_bucket(transfer: _Transfer, reply: WeightsBucket, index: int) -> None:
    step = transfer.announced.step
    encodings = reply.encodings or [RAW] * len(reply.names)
    chunks = reply.chunks or [1] * len(reply.names)
    if (
        not len(reply.names) == len(encodings) == len(chunks)
        or sum(chunks) != len(reply.tensors)
        or min(chunks, default=1) < 1
    ):
        raise WeightsCorrupt(f"step {step}: bucket {index} has {len(reply.names)} names, {len(encodings)} "
                             f"encodings, chunks {chunks[:8]} and {len(reply.tensors)} tensors")  # fmt: skip
    if XOR_ZSTD in encodings and (transfer.base is None or reply.base_step != transfer.base.step):
        held = transfer.base.step if transfer.base is not None else None
        raise WeightsCorrupt(f"step {step}: bucket {index} holds deltas against step {reply.base_step}, "
                             f"this replica holds step {held}")  # fmt: skip
    start = 0
    for name, encoding, count in zip(reply.names, encodings, chunks, strict=True):
        pieces, start = reply.tensors[start : start + count], start + count
        meta = transfer.by_name.get(name)
        if meta is None or meta.bucket != index:
            raise WeightsCorrupt(f"step {step}: tensor {name} is not in bucket {index} of the manifest")
        if name in transfer.received:
            raise WeightsCorrupt(f"step {step}: tensor {name} arrived twice")
        transfer.wire_bytes += sum(piece.nbytes for piece in pieces)
        digest = None
        if encoding == XOR_ZSTD:
            array = _decoded(transfer, name, _joined(pieces))
        elif count == 1 and transfer.staging is None:
            array = pieces[0]  # the frame itself, no copy
        else:
            array, digest = _assembled(transfer, meta, pieces)
        _verify(meta, array, step, digest)
        transfer.received[name] = array


def _joined(pieces: list[np.ndarray]) -> np.ndarray:
    if len(pieces) == 1:
        return pieces[0]
    return np.concatenate([np.ascontiguousarray(piece).reshape(-1).view(np.uint8) for piece in pieces])


def _assembled(transfer: _Transfer, meta: TensorMeta, pieces: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """The tensor whose pieces (1-D, one dtype) these are, in a staging buffer or a new array,
    and its checksum, taken piece by piece while each piece is in cache."""
    step, dtype = transfer.announced.step, pieces[0].dtype
    total = sum(piece.nbytes for piece in pieces)
    if any(piece.dtype != dtype for piece in pieces) or total != meta.nbytes or meta.nbytes % dtype.itemsize:
        raise WeightsCorrupt(f"step {step}: the {len(pieces)} piece(s) of tensor {meta.name} do not make "
                             f"{meta.nbytes} bytes of one dtype")  # fmt: skip
    target = transfer.staging.buffer(meta.name, total) if transfer.staging else np.empty(total, np.uint8)
    offset, digest = 0, hasher()
    for piece in pieces:
        raw = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
        digest.update(raw)
        target[offset : offset + raw.nbytes] = raw
        offset += raw.nbytes
    if math.prod(meta.shape) * dtype.itemsize != total:
        raise WeightsCorrupt(f"step {step}: tensor {meta.name} has {total} bytes of {dtype}, manifest says shape "
                             f"{meta.shape}")  # fmt: skip
    return target.view(dtype).reshape(meta.shape), digest.intdigest()


def _decoded(transfer: _Transfer, name: str, packed: np.ndarray) -> np.ndarray:
    base = transfer.base.tensors.get(name) if transfer.base is not None else None
    if base is None:
        raise WeightsCorrupt(f"step {transfer.announced.step}: delta of tensor {name}, which the base step lacks")
    transfer.num_delta_tensors += 1
    return decode_delta(packed, base, name)


def _verify(meta: TensorMeta, array: np.ndarray, step: int, digest: int | None = None) -> None:
    if list(array.shape) != meta.shape or array.nbytes != meta.nbytes:
        raise WeightsCorrupt(f"step {step}: tensor {meta.name} has shape {list(array.shape)}, manifest says "
                             f"{meta.shape}")  # fmt: skip
    if (checksum(array) if digest is None else digest) != meta.checksum:
        raise WeightsCorrupt(f"step {step}: checksum mismatch on tensor {meta.name}")


def _complete(transfer: _Transfer) -> FetchedStep:
    announced = transfer.announced
    missing = set(transfer.by_name) - set(transfer.received)
    if missing:
        raise WeightsCorrupt(f"step {announced.step}: {len(missing)} tensor(s) never arrived, e.g. {min(missing)}")
    tensors = [(meta.name, transfer.received[meta.name], meta.dtype) for meta in announced.manifest]
    return FetchedStep(announced, tensors, transfer.wire_bytes, transfer.num_delta_tensors)
