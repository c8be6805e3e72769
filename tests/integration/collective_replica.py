"""A replica process for the collective weight transport tests: what vLLM's worker does with a step
(``worker_extension.rlbus_load_step``), without vLLM: take the broadcast, else fetch over the bus.

Announcements come in on a queue (the replica's bus side is tested elsewhere); each step's result,
(rank, step, path, digest of the tensors loaded, group), goes out on another.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from typing import Any

import msgspec
import numpy as np

from rlbus.config import BusConfig
from rlbus.messages import WeightsAnnounced

RESULT_FIELDS = ("rank", "step", "path", "digest", "group")


def digest_of(named_bytes: list[tuple[str, bytes]]) -> str:
    """sha256 over every tensor's name and raw bytes, in manifest order: equal only for exact tensors."""
    hasher = hashlib.sha256()
    for name, raw in named_bytes:
        hasher.update(name.encode() + b"\0" + raw)
    return hasher.hexdigest()


def arrays_digest(tensors: list[tuple[str, np.ndarray, str]]) -> str:
    return digest_of([(name, np.ascontiguousarray(array).tobytes()) for name, array, _ in tensors])


def run_replica(settings: dict[str, Any], fetch_address: str, inbox: mp.Queue, outbox: mp.Queue) -> None:
    import torch

    from rlbus.services.inference.weight_collective import GroupSettings, WeightReceiver, receive_broadcast
    from rlbus.services.inference.worker_extension import pull_weights
    from rlbus.weights import ReplicaTransfer

    group_settings = GroupSettings(**settings)
    if group_settings.backend == "nccl":
        torch.cuda.set_device(group_settings.rank)
    receiver = WeightReceiver(group_settings).start()
    transfer = ReplicaTransfer()
    outbox.put(("started", group_settings.rank))
    while (item := inbox.get()) is not None:
        announced = msgspec.convert(item, WeightsAnnounced)
        broadcast = receive_broadcast(announced, receiver)
        if broadcast is not None:
            path = "collective"
            digest = digest_of([(name, tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes())
                                for name, tensor in broadcast.tensors])  # fmt: skip
            broadcast.release()
        else:
            path = "bus"
            fetched = pull_weights(announced, fetch_address, f"replica-{group_settings.rank}",
                                   BusConfig(request_timeout_s=5), transfer)  # fmt: skip
            digest = arrays_digest(fetched.tensors)
        outbox.put((group_settings.rank, announced.step, path, digest, announced.broadcast_group))
    receiver.stop()
