"""The replica side of the collective weight transport (``weight_transport = "collective"``).

A :class:`WeightReceiver` thread runs in the vLLM worker (started with the replica, before any step):
it connects to the trainer's TCPStore, joins the group the store names (a process group of its
own, never vLLM's), and takes part in every broadcast the trainer makes, into buffers it reuses
(on the GPU for NCCL, in host memory for gloo; a second set only while a load reads the first).
It runs whether or not a load is under way, so the trainer never waits for a replica's swap.

A load (``worker_extension.rlbus_load_step``) of a step announced with ``broadcast_group`` asks
:func:`receive_broadcast` for it: it waits until this step's broadcast arrived, then checks every
tensor against the announcement's manifest (xxh3 of a host copy; ``weight_group_verify``) before
anything is loaded. It answers None, and the worker fetches the step over the bus as always, when
this replica is not in that group, the broadcast failed or timed out, a newer step came instead, or
a checksum did not match. A group whose collective failed is left for good; the receiver then
joins the next generation the trainer names. The settings reach the worker in :data:`ENV_VAR`
(:func:`export_for_workers`, called by the server before vLLM starts its processes).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import timedelta

import numpy as np
import torch
from loguru import logger
from torch import distributed as dist

from rlbus.messages import WeightsAnnounced
from rlbus.weight_codec import WeightsCorrupt, checksum
from rlbus.weights_collective import (
    GROUP_KEY,
    BroadcastHeader,
    bucket_layout,
    formed_key,
    header_key,
    parse_address,
    rendezvous_prefix,
)

ENV_VAR = "_RLBUS_WEIGHT_GROUP"
"""Set by the inference server for its vLLM processes; not a config variable (no ``RLBUS_`` prefix)."""
POLL_S = 0.5
"""How often a receiver looks for a new group while none is formed."""
HEADER_POLL_S = 0.02
"""How often a receiver in a group looks for the next step's header (a round trip to the store)."""


@dataclass(frozen=True)
class GroupSettings:
    address: str
    rank: int
    size: int
    backend: str = "gloo"
    timeout_s: float = 60.0
    verify: bool = True


def export_for_workers(settings: GroupSettings | dict | None) -> None:
    """Hand ``settings`` (``InferenceConfig.weight_group_settings()``) to the vLLM processes this one
    starts; None: the bus only."""
    if settings is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = json.dumps(asdict(settings) if isinstance(settings, GroupSettings) else settings)


def settings_from_env() -> GroupSettings | None:
    value = os.environ.get(ENV_VAR)
    return GroupSettings(**json.loads(value)) if value else None


def local_host_towards(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (what gloo must bind to be reachable from it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))  # UDP: picks the route, sends nothing
        return probe.getsockname()[0]


def new_group(backend: str, store: dist.Store, rank: int, size: int, timeout_s: float, host: str) -> dist.ProcessGroup:
    """A process group on ``store`` only (vLLM's default group is left alone); gloo binds ``host``."""
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timedelta(seconds=timeout_s)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, size, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timedelta(seconds=2 * timeout_s + 60)  # ours acts first (see broadcast)
    return dist.ProcessGroupNCCL(store, rank, size, options)


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, timeout_s: float) -> None:
    """Receive ``tensor`` from rank 0; TimeoutError past ``timeout_s`` (the group is then unusable)."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    work = group.broadcast([tensor], options)
    deadline, pause = time.monotonic() + timeout_s, 1e-4
    while not work.is_completed():  # polled: NCCL's wait() would not return before its watchdog
        if time.monotonic() > deadline:
            raise TimeoutError(f"broadcast of {tensor.numel()} bytes did not finish within {timeout_s:g}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    work.wait()
    if tensor.is_cuda:
        torch.cuda.current_stream().synchronize()


@dataclass
class Received:
    """A step's buffers, held for a load until :meth:`WeightReceiver.release`."""

    group: str
    step: int
    index: int
    buffers: list[torch.Tensor]


class WeightReceiver:
    """Joins the trainer's weight group and receives every broadcast (a daemon thread)."""

    def __init__(self, settings: GroupSettings) -> None:
        if settings.backend == "auto":  # as the trainer resolves it: nccl where CUDA is available
            settings = replace(settings, backend="nccl" if torch.cuda.is_available() else "gloo")
        self.settings = settings
        self.host, self.port = parse_address(settings.address)
        self.device = torch.device("cuda", torch.cuda.current_device()) if settings.backend == "nccl" else None
        self.group = ""
        """The group joined ("" while none)."""
        self._left: set[str] = set()
        self._sets: list[list[torch.Tensor]] = [[], []]
        self._latest: Received | None = None
        self._receiving: tuple[str, int] | None = None
        self._pinned: int | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weight-receiver", daemon=True)

    def start(self) -> WeightReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.timeout_s + 5)

    def take(self, announced: WeightsAnnounced) -> Received | None:
        """The buffers of ``announced``'s broadcast once received (release them after loading), or
        None when it will not come: not in that group, the group failed, a newer step came instead."""
        group, step = announced.broadcast_group, announced.step
        deadline = time.monotonic() + 2 * self.settings.timeout_s
        with self._changed:
            if self.group != group:
                logger.info("step {} is broadcast in weight group {}; this replica is in {!r}: over the bus",
                            step, group, self.group)  # fmt: skip
                return None
            while True:
                latest = self._latest
                if latest is not None and (latest.group, latest.step) == (group, step):
                    self._pinned = latest.index
                    return latest
                past = self._receiving is not None and self._receiving[0] == group and self._receiving[1] > step
                if self.group != group or past or (latest is not None and latest.step > step):
                    return None
                if not self._changed.wait(deadline - time.monotonic()):
                    logger.warning("no broadcast of step {} within {:g}s", step, 2 * self.settings.timeout_s)
                    return None

    def release(self, received: Received) -> None:
        with self._changed:
            if self._pinned == received.index:
                self._pinned = None

    def _run(self) -> None:
        store = None
        while not self._stop.is_set():
            try:
                store = store or dist.TCPStore(self.host, self.port, None, False, timedelta(seconds=10))
                name = store.get(GROUP_KEY).decode() if store.check([GROUP_KEY]) else ""
                if name and name not in self._left and not store.check([formed_key(name)]):
                    self._member_of(store, name)
                    continue
            except Exception as exc:  # noqa: BLE001 - the trainer restarted or is not up yet: connect again
                logger.debug("weight group store at {}: {}", self.settings.address, exc)
                store = None
            self._stop.wait(POLL_S)

    def _member_of(self, store: dist.TCPStore, name: str) -> None:
        """Join ``name`` and receive its broadcasts until it fails or the trainer names another."""
        group = None
        try:
            prefixed = dist.PrefixStore(rendezvous_prefix(name), store)
            host = local_host_towards(self.host, self.port) if self.settings.backend == "gloo" else ""
            group = new_group(self.settings.backend, prefixed, self.settings.rank, self.settings.size,
                              self.settings.timeout_s, host)  # fmt: skip
            with self._changed:
                self.group = name  # before the first broadcast: the trainer announces the group only after it
            broadcast(group, torch.zeros(1, dtype=torch.uint8, device=self.device), self.settings.timeout_s)
            logger.info("joined weight group {} as rank {} of {}", name, self.settings.rank, self.settings.size)
            sequence = 0
            while not self._stop.is_set():
                header = self._next_header(store, name, sequence)
                if header is None:
                    break
                self._receive(group, name, header)
                sequence += 1
        except Exception as exc:  # noqa: BLE001 - unusable from now on: leave it, wait for the next one
            logger.warning("left weight group {}: {}", name, exc)
        finally:
            self._left.add(name)
            with self._changed:
                self.group, self._receiving = "", None
                self._changed.notify_all()
            if group is not None:
                try:
                    group.abort()
                except Exception as exc:  # noqa: BLE001
                    logger.debug("weight group abort: {}", exc)

    def _next_header(self, store: dist.TCPStore, name: str, sequence: int) -> BroadcastHeader | None:
        """Header number ``sequence`` of ``name``, waited for; None once the trainer names another group.
        Polled with ``check``: a ``store.wait`` that times out logs a c10d warning each time, which
        would fill the replica's log every poll while no step comes."""
        key = header_key(name, sequence)
        while not self._stop.is_set():
            if store.check([key]):
                return BroadcastHeader.decode(store.get(key))
            if store.get(GROUP_KEY).decode() != name:
                return None
            self._stop.wait(HEADER_POLL_S)
        return None

    def _receive(self, group: dist.ProcessGroup, name: str, header: BroadcastHeader) -> None:
        with self._changed:
            self._receiving = (name, header.step)
            index = 1 if self._pinned == 0 else 0
            if self._latest is not None and self._latest.index == index:
                self._latest = None  # overwritten now
            self._changed.notify_all()
        buffers = self._sets[index]
        if [buffer.numel() for buffer in buffers] != header.bucket_sizes:
            buffers = self._sets[index] = [torch.empty(size, dtype=torch.uint8, device=self.device)
                                           for size in header.bucket_sizes]  # fmt: skip
        for buffer in buffers:
            broadcast(group, buffer, self.settings.timeout_s)
        with self._changed:
            self._latest = Received(name, header.step, index, buffers)
            self._changed.notify_all()


def received_tensors(received: Received, announced: WeightsAnnounced, verify: bool) -> list[tuple[str, torch.Tensor]]:
    """The tensors of ``announced`` in ``received``'s buffers (views, no copy), checked against its
    manifest; WeightsCorrupt, and nothing may load, when any differs."""
    sizes, slots = bucket_layout(announced.manifest, announced.num_buckets)
    if [buffer.numel() for buffer in received.buffers] != sizes:
        raise WeightsCorrupt(f"step {announced.step}: broadcast buckets of {[b.numel() for b in received.buffers]} "
                             f"bytes, the manifest lays out {sizes}")  # fmt: skip
    tensors = []
    for slot in slots:
        meta = slot.meta
        raw = received.buffers[meta.bucket][slot.offset : slot.offset + meta.nbytes]
        if verify and checksum(raw.cpu().numpy()) != meta.checksum:
            raise WeightsCorrupt(f"step {announced.step}: checksum mismatch on broadcast tensor {meta.name}")
        tensors.append((meta.name, raw.view(torch_dtype(meta.dtype)).reshape(meta.shape)))
    return tensors


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest's logical dtype name (``bfloat16`` included)."""
    if name == "bfloat16":
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, dtype=np.dtype(name))).dtype


_receiver: WeightReceiver | None = None


def process_receiver() -> WeightReceiver | None:
    """This process's receiver, started on first use; None where the transport is the bus."""
    global _receiver
    if _receiver is None and (settings := settings_from_env()) is not None:
        _receiver = WeightReceiver(settings).start()
    return _receiver


@dataclass
class Broadcast:
    tensors: list[tuple[str, torch.Tensor]]
    release: Callable[[], None]


def receive_broadcast(announced: WeightsAnnounced, receiver: WeightReceiver | None = None) -> Broadcast | None:
    """``announced``'s tensors from its broadcast, verified (call ``release()`` once loaded), or None:
    fetch it over the bus (not broadcast to this replica, failed, or refused; said in the log)."""
    receiver = receiver or process_receiver()
    if receiver is None or not announced.broadcast_group or announced.lora is not None:
        return None
    received = receiver.take(announced)
    if received is None:
        return None
    try:
        tensors = received_tensors(received, announced, receiver.settings.verify)
    except (WeightsCorrupt, ValueError) as exc:
        receiver.release(received)
        logger.warning("refused the broadcast of step {}: {}; fetching it over the bus", announced.step, exc)
        return None
    return Broadcast(tensors, lambda: receiver.release(received))
