"""The torch-free half of the collective weight transport (``weight_transport = "collective"``).

A trainer and a fixed set of replicas may form a process group of their own (gloo on CPUs, NCCL
on GPUs that share a fabric) and receive each step as one broadcast per bucket instead of
fetching it over the bus. The torch side lives in the services
(``rlbus.services.trainer.weight_broadcast`` sends, ``rlbus.services.inference.weight_collective``
receives); what both must agree on is here:

* the rendezvous: a TCPStore the trainer binds at ``weight_group_address``; the trainer writes the
  current group's name (``epoch.generation``) under :data:`GROUP_KEY`, replicas join that group;
  a broken group is never reused, the trainer names the next generation instead;
* the layout: each bucket travels as one flat byte buffer holding its tensors in manifest order,
  each at an offset aligned to :data:`ALIGN` bytes (:func:`bucket_layout`), so a receiver can
  view every tensor in place and check it against the manifest's xxh3 checksum;
* the header the trainer writes to the store before each broadcast (:class:`BroadcastHeader`):
  which step and how many bytes per bucket, so a receiver sizes its buffers before the data comes.

The bus stays the source of truth: the ``WeightsAnnounced`` of a broadcast step names the group
in ``broadcast_group``, its manifest is what the received bytes are checked against, and the
trainer serves the step over the bus as always, for any replica the broadcast failed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rlbus.messages import TensorMeta

ALIGN = 64
"""Byte alignment of every tensor in a flat bucket buffer (any dtype can view it in place)."""
GROUP_KEY = "rlbus/weight_group"
"""Store key holding the name of the group the trainer forms or uses now."""
HEADER_LIMIT = 1 << 20
"""Largest header a receiver decodes (a step of 10^5 buckets would still fit)."""

_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ValueError naming what is wrong."""
    match = _ADDRESS.match(address)
    if match is None:
        raise ValueError(f"weight group address {address!r} is not host:port (e.g. 10.0.0.5:29650)")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"weight group address {address!r}: port {port} is not in 1-65535")
    return match["host"].strip("[]"), port


def group_name(epoch: str, generation: int) -> str:
    """The name of one group: the trainer process's ``epoch`` (random per start) and the generation."""
    return f"{epoch}.{generation}"


def header_key(group: str, sequence: int) -> str:
    """Store key of the header of broadcast number ``sequence`` (from 0) in ``group``."""
    return f"{group}/broadcast/{sequence}"


def formed_key(group: str) -> str:
    """Store key the trainer sets once ``group`` formed: a replica that comes later (a restart) never
    joins it, it waits for the next generation (a broadcast to the rank it replaced fails first)."""
    return f"{group}/formed"


def rendezvous_prefix(group: str) -> str:
    """Store prefix under which the process group of ``group`` exchanges its addresses."""
    return f"{group}/pg/"


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in its bucket's flat buffer."""

    meta: TensorMeta
    offset: int


def bucket_layout(manifest: list[TensorMeta], num_buckets: int) -> tuple[list[int], list[Slot]]:
    """(bytes of each bucket's flat buffer, where each tensor lies), tensors in manifest order.
    ValueError for a manifest whose bucket indices fall outside ``num_buckets``."""
    sizes = [0] * num_buckets
    slots: list[Slot] = []
    for meta in manifest:
        if not 0 <= meta.bucket < num_buckets:
            raise ValueError(f"tensor {meta.name} is in bucket {meta.bucket}; the step has {num_buckets}")
        slots.append(Slot(meta, sizes[meta.bucket]))
        sizes[meta.bucket] += aligned(meta.nbytes)
    return sizes, slots


@dataclass(frozen=True)
class BroadcastHeader:
    """What the trainer writes to the store before broadcasting a step: its number and bucket sizes."""

    step: int
    bucket_sizes: list[int]

    def encode(self) -> bytes:
        return json.dumps({"step": self.step, "bucket_sizes": self.bucket_sizes}).encode()

    @staticmethod
    def decode(raw: bytes) -> BroadcastHeader:
        """The header in ``raw``; ValueError for anything that is not one (a receiver then leaves the group)."""
        if len(raw) > HEADER_LIMIT:
            raise ValueError(f"broadcast header of {len(raw)} bytes (at most {HEADER_LIMIT})")
        try:
            fields = json.loads(raw)
            step, sizes = fields["step"], fields["bucket_sizes"]
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"broadcast header is not JSON with step and bucket_sizes: {exc}") from exc
        if not isinstance(step, int) or not isinstance(sizes, list) or not sizes:
            raise ValueError(f"broadcast header has step {step!r} and bucket_sizes {str(sizes)[:80]}")
        if not all(isinstance(size, int) and 0 <= size for size in sizes):
            raise ValueError(f"broadcast header has bucket sizes that are not byte counts: {sizes[:8]}")
        return BroadcastHeader(step, sizes)
