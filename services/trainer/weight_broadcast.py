"""The trainer side of the collective weight transport (``weight_transport = "collective"``).

Rank 0 binds a TCPStore at ``weight_group_address`` and forms a process group of its own with
``weight_group_replicas`` replicas (ranks 1..N): built on that store, never torch.distributed's
default group, which FSDP (and vLLM on the other side) own. Forming waits for every replica, so it
runs on a background thread, as do the broadcasts: training never waits for a replica.

Per step (full weights only; adapters travel over the bus), :meth:`WeightBroadcaster.ready_group`
says whether the step can go out collectively (a group is formed and the last broadcast is done);
the step is then announced with that ``broadcast_group``, :meth:`WeightBroadcaster.submit` copies
its tensors into one flat buffer per bucket (on the GPU for NCCL), and the thread writes the
header (``rlbus.weights_collective.BroadcastHeader``) to the store and broadcasts bucket by bucket.
The WeightServer serves every step as before, so a replica whose broadcast failed fetches it.

A broadcast or a forming that fails or passes ``weight_group_timeout_s`` drops the group for good
(a timed-out collective cannot be reused): the trainer logs it, names the next generation in the
store and forms it in the background; steps meanwhile travel over the bus. A replica that is gone
for good keeps the group from forming: then every step travels over the bus, one warning per failed
attempt at first, then quietly.
"""

from __future__ import annotations

import secrets
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from loguru import logger
from torch import distributed as dist

from rlbus.messages import LoraAdapterMeta, WeightsAnnounced
from rlbus.services.trainer.config import TrainerConfig
from rlbus.weight_codec import NamedArray
from rlbus.weights import WeightServer
from rlbus.weights_collective import (
    GROUP_KEY,
    BroadcastHeader,
    bucket_layout,
    formed_key,
    group_name,
    header_key,
    parse_address,
    rendezvous_prefix,
)

QUIET_AFTER = 3
"""Failed attempts to form a group that are logged as warnings before the rest go to debug."""


def resolve_backend(backend: str) -> str:
    """``auto`` -> nccl where CUDA is available, else gloo; anything else as asked."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError('weight_group_backend = "nccl" needs CUDA; this process has none (use gloo)')
    return backend


def new_group(backend: str, store: dist.Store, rank: int, size: int, timeout_s: float, host: str) -> dist.ProcessGroup:
    """A process group on ``store`` only (the default group is left alone); gloo binds ``host``."""
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timedelta(seconds=timeout_s)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, size, options)
    options = dist.ProcessGroupNCCL.Options()
    # NCCL's watchdog acts on its own timeout: ours (``broadcast``) must come first and abort.
    options._timeout = timedelta(seconds=2 * timeout_s + 60)
    return dist.ProcessGroupNCCL(store, rank, size, options)


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, timeout_s: float) -> None:
    """Broadcast ``tensor`` from rank 0; TimeoutError past ``timeout_s`` (the group is then unusable)."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    work = group.broadcast([tensor], options)
    deadline, pause = time.monotonic() + timeout_s, 1e-4
    while not work.is_completed():  # polled: NCCL's wait() would not return before its watchdog
        if time.monotonic() > deadline:
            raise TimeoutError(f"broadcast of {tensor.numel()} bytes did not finish within {timeout_s:g}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    work.wait()  # raises what the collective raised
    if tensor.is_cuda:
        torch.cuda.current_stream().synchronize()


def drop(group: dist.ProcessGroup | None) -> None:
    """Tear ``group`` down; a group whose collective failed may hang on a clean shutdown."""
    if group is None:
        return
    try:
        group.abort()
    except Exception as exc:  # noqa: BLE001 - already broken: nothing more to do with it
        logger.debug("weight group abort: {}", exc)


@dataclass
class _Step:
    group: str
    header: BroadcastHeader


class WeightBroadcaster:
    """Rank 0's end of the weight group: forms it, broadcasts submitted steps, re-forms it after a failure."""

    def __init__(self, address: str, num_replicas: int, backend: str = "auto", timeout_s: float = 60.0) -> None:
        host, port = parse_address(address)
        self.backend, self.size, self.timeout_s = resolve_backend(backend), num_replicas + 1, timeout_s
        self.host = host if host not in ("0.0.0.0", "::", "") else ""
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None
        # The master store binds now, on the caller's thread: a port in use fails the trainer's start.
        self.store = dist.TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
        self.address = f"{host}:{self.store.port}"
        self.epoch = secrets.token_hex(4)
        self.generation = 0
        self.num_broadcasts = self.num_failures = 0
        self._group: dist.ProcessGroup | None = None
        self._name = ""
        self._sequence = 0
        self._buffers: list[torch.Tensor] = []
        self._pending: _Step | None = None
        self._busy = False
        self._failed_forms = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weight-broadcast", daemon=True)

    def start(self) -> WeightBroadcaster:
        self._thread.start()
        logger.info("weight group: {} rendezvous at {} for {} replica(s)", self.backend, self.address, self.size - 1)
        return self

    def ready_group(self) -> str:
        """The group the next step can be broadcast in, "" when none is formed or one is still going out."""
        with self._changed:
            return self._name if self._group is not None and not self._busy else ""

    def submit(self, announced: WeightsAnnounced, arrays: dict[str, np.ndarray]) -> bool:
        """Broadcast ``announced`` (whose ``broadcast_group`` came from :meth:`ready_group`), its tensors
        copied now; False (the step goes over the bus only) when that group is gone or busy."""
        sizes, slots = bucket_layout(announced.manifest, announced.num_buckets)
        with self._changed:
            if self._group is None or self._busy or announced.broadcast_group != self._name:
                return False
            self._busy = True
        self._fill(sizes, [(slot.offset, arrays[slot.meta.name]) for slot in slots],
                   [slot.meta.bucket for slot in slots])  # fmt: skip
        with self._changed:
            self._pending = _Step(announced.broadcast_group, BroadcastHeader(announced.step, sizes))
            self._changed.notify_all()
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no broadcast is under way (done or failed); True if so within ``timeout_s``."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._busy, timeout_s)

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout=self.timeout_s + 5)
        drop(self._group)

    def _fill(self, sizes: list[int], pieces: list[tuple[int, np.ndarray]], buckets: list[int]) -> None:
        if [buffer.numel() for buffer in self._buffers] != sizes:
            self._buffers = [torch.zeros(size, dtype=torch.uint8, device=self.device) for size in sizes]
        for (offset, array), bucket in zip(pieces, buckets, strict=True):
            raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only arrays: only read here
                source = torch.from_numpy(raw)
            self._buffers[bucket][offset : offset + raw.nbytes].copy_(source)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._group is None:
                self._form()
                continue
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None or self._stop.is_set())
                step, self._pending = self._pending, None
            if step is not None:
                self._broadcast(step)

    def _form(self) -> None:
        name = group_name(self.epoch, self.generation)
        self.store.set(GROUP_KEY, name)
        started = time.monotonic()
        group = None
        try:
            prefixed = dist.PrefixStore(rendezvous_prefix(name), self.store)
            group = new_group(self.backend, prefixed, 0, self.size, self.timeout_s, self.host)
            broadcast(group, torch.zeros(1, dtype=torch.uint8, device=self.device), self.timeout_s)  # all connected
        except Exception as exc:  # noqa: BLE001 - a replica missing or gone: try the next generation
            drop(group)
            self._failed_forms += 1
            log = logger.warning if self._failed_forms <= QUIET_AFTER else logger.debug
            log("weight group {} did not form within {:.0f}s ({}); steps go over the bus, trying again", name,
                time.monotonic() - started, exc)  # fmt: skip
            self.generation += 1
            return
        self._failed_forms = 0
        self.store.set(formed_key(name), "1")
        with self._changed:
            self._group, self._name, self._sequence = group, name, 0
        logger.info("weight group {} formed: {} replica(s), {}", name, self.size - 1, self.backend)

    def _broadcast(self, step: _Step) -> None:
        started = time.monotonic()
        try:
            self.store.set(header_key(step.group, self._sequence), step.header.encode())
            self._sequence += 1
            for buffer in self._buffers:
                broadcast(self._group, buffer, self.timeout_s)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the group is unusable: drop it, re-form in the background
            self.num_failures += 1
            logger.warning("broadcast of step {} in weight group {} failed after {:.1f}s ({}); replicas fetch it "
                           "over the bus, a new group generation forms", step.header.step, step.group,
                           time.monotonic() - started, exc)  # fmt: skip
            with self._changed:
                drop(self._group)
                self._group, self._name = None, ""
                self.generation += 1
        else:
            self.num_broadcasts += 1
            seconds = time.monotonic() - started
            logger.debug("broadcast step {} ({:.1f} MB) in {:.2f}s", step.header.step,
                         sum(step.header.bucket_sizes) / 1e6, seconds)  # fmt: skip
        with self._changed:
            self._busy = False
            self._changed.notify_all()


def publish_step(server: WeightServer, broadcaster: WeightBroadcaster | None, step: int,
                 tensors: Iterable[NamedArray], lora: LoraAdapterMeta | None = None) -> WeightsAnnounced:  # fmt: skip
    """Publish ``step`` on ``server`` as always and, when ``broadcaster`` has a group ready and the
    step holds the full weights, announce it with that group and broadcast it too."""
    group = broadcaster.ready_group() if broadcaster is not None and lora is None else ""
    if not group:
        return server.publish(step, tensors, lora)
    arrays: dict[str, np.ndarray] = {}

    def kept(items: Iterable[NamedArray]) -> Iterator[NamedArray]:
        for name, array, dtype in items:
            arrays[name] = array
            yield name, array, dtype

    announced = server.publish(step, kept(tensors), lora, broadcast_group=group)
    if not broadcaster.submit(announced, arrays):  # type: ignore[union-attr]
        logger.info("weight group {} dropped before step {} went out: replicas fetch it over the bus", group, step)
    return announced


def broadcaster_for(config: TrainerConfig) -> WeightBroadcaster | None:
    """The broadcaster ``config`` asks for (``weight_transport = "collective"``), started; else None."""
    if config.weight_transport != "collective":
        return None
    assert config.weight_group_address is not None  # the config's validator saw to it
    return WeightBroadcaster(config.weight_group_address, config.weight_group_replicas, config.weight_group_backend,
                             config.weight_group_timeout_s).start()  # fmt: skip
