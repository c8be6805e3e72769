"""Ranks under ``torchrun``: process group, FSDP2 sharding and small collectives.

One process is a world of one: no process group is created and every collective
below is a no-op, so the same training code runs alone or as one of many ranks.
Under torchrun (``WORLD_SIZE`` > 1) ranks talk over gloo on CPU and nccl on GPU,
and each decoder layer is its own FSDP2 unit, so parameters are gathered one
layer at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced over ranks in place (``sum``, ``max`` or ``min``)."""
        if self.is_distributed:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def all_gather_ints(self, value: int) -> list[int]:
        """``value`` of every rank, in rank order."""
        local = torch.tensor([value], dtype=torch.int64, device=self.device)
        if not self.is_distributed:
            return [value]
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        return [int(t.item()) for t in gathered]

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank, as JSON (tuples arrive as lists). Not
        ``broadcast_object_list``: that unpickles what rank 0 sent, and nothing is pickled in rlbus."""
        if not self.is_distributed:
            return value
        data = json.dumps(value).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=0)
        buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.is_main:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, src=0)
        return json.loads(buffer.cpu().numpy().tobytes())

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def init_distributed() -> DistContext:
    """Join the ``torchrun`` world described by the environment (or be a world of one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("rank {} of {} joined the process group ({})", rank, world_size, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module, ctx: DistContext, offload: bool = False) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 (one unit per decoder layer, then the rest); no-op alone.
    ``offload`` (``memory.offload_optimizer``): FSDP2 keeps parameters, gradients and optimizer
    state in host memory and the optimizer steps there.

    FSDP2 averages gradients over ranks; the losses are normalised by the step's
    global token count and need a sum, so :class:`TrainStep` scales them by the
    world size (``set_gradient_divide_factor(1)`` would need PREMUL_SUM, which gloo lacks).
    """
    if offload and not (ctx.is_distributed and ctx.device.type == "cuda"):
        raise ValueError("memory.offload_optimizer needs FSDP2 on GPUs: 2 or more ranks with CUDA devices "
                         f"(this rank: {ctx.world_size} rank(s) on {ctx.device.type})")  # fmt: skip
    if not ctx.is_distributed:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers to shard; FSDP2 needs a decoder-only LM")
    for layer in layers:
        fully_shard(layer, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    return model
