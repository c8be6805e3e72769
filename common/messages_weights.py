"""Messages of the weight channels: trainer -> inference weights, and the policy each replica serves.

:mod:`rlbus.messages` re-exports everything here.
"""

# ruff: noqa: RUF012 - msgspec copies a mutable default for each instance; ruff sees that only in
# direct subclasses of msgspec.Struct, not in those of Message and Payload.

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from rlbus.messages_base import Message, Payload

# --------------------------------------------------------------------------
# Weights: trainer (XPUB + ROUTER, binds) -> inference replicas (SUB + DEALER)
# --------------------------------------------------------------------------


class TensorMeta(Payload, kw_only=True):
    """Description of one parameter in a weights manifest."""

    name: str
    dtype: str
    """Logical dtype, e.g. ``float32``; ``bfloat16`` travels as uint16 bits."""
    shape: list[int]
    nbytes: int
    bucket: int
    """Which ``WeightsBucket`` carries the tensor."""
    checksum: int
    """xxh3_64 of the tensor's raw bytes (``rlbus.weight_codec.checksum``; CRC32 before version 2)."""


ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A LoRA adapter's name: clients pass it as ``model`` and replicas make it a folder name, so no path
separators, no leading dot (``..``) and at most 64 characters."""


class LoraAdapterMeta(Payload, kw_only=True):
    """The LoRA adapter a ``WeightsAnnounced`` carries instead of full weights (docs/lora.md).

    Not range-checked on decode (the message strategies build every type from its hints): a replica
    checks it before fetching anything (``rlbus.services.inference.adapters.check_adapter_meta``)."""

    name: str
    """Adapter name clients pass as ``model`` (``ADAPTER_NAME_PATTERN``); a replica keys adapters by it."""
    rank: int
    """LoRA rank r (> 0; at most the replica's ``max_lora_rank``)."""
    alpha: float
    """Scale numerator: the update is ``alpha / rank * B @ A``."""
    target_modules: list[str]
    """Module names the adapter applies to, as PEFT matches them (non-empty)."""
    base_fingerprint: str = ""
    """sha256 of the trainer's frozen base (``rlbus.services.trainer.lora.base_fingerprint``), "" if unknown."""


class WeightsAnnounced(Message, kw_only=True):
    """Trainer -> inference (PUB), and reply to ``WeightsQuery``.

    Announces that ``step`` can be fetched bucket by bucket. Version 2: ``TensorMeta.checksum``
    is xxh3_64 instead of CRC32 (same field, another meaning: older peers must refuse it), and
    ``delta``. Version 3: ``lora``. Though defaulted, it is a bump: a version-2 replica given an
    adapter's announcement would fail on the unknown field at best, and at worst (a decoder that
    dropped unknown fields) load adapter tensors as if they were the model's; the codec refuses
    the other version by name instead, before anything is fetched. Version 4: ``broadcast_group``
    (every field change bumps the version, docs/protocol.md; a version-3 replica refuses it and
    asks again, a version-4 one treats an empty name as before).
    """

    VERSION: ClassVar[int] = 4

    step: int
    manifest: list[TensorMeta]
    num_buckets: int
    total_bytes: int
    published_at: float
    delta: bool = False
    """The trainer answers fetches that name a base step with deltas against it: a replica keeps
    the step it loaded, to fetch the next one as a delta (``WeightsFetch.base_step``)."""
    lora: LoraAdapterMeta | None = None
    """Set when the step holds only a LoRA adapter's tensors (PEFT names, e.g.
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``): replicas load it as this
    adapter, in place, on the base they serve. None: the step holds the full weights."""
    broadcast_group: str = ""
    """Set when the trainer also broadcasts this step over its collective weight group (docs/inference.md):
    the group's name (``epoch.generation``, ``rlbus.weights_collective``). A replica in that group
    takes the broadcast, checked against this manifest, and fetches over the bus when it is not in
    it or the broadcast fails; "" (every step of a bus-only trainer): fetch over the bus."""


class WeightsQuery(Message, kw_only=True):
    """Inference -> trainer: which step is latest? (late joiners ask this).

    Version 2 added ``adapter``: one trainer may serve several runs' adapters, each with its own
    latest step, so the question names whose. A bump, though defaulted: a version-1 trainer would
    answer with its latest step of any adapter, which a replica would load as its own run's."""

    VERSION: ClassVar[int] = 2

    replica_id: str
    adapter: str = ""
    """Whose latest step: a LoRA adapter's name (``ADAPTER_NAME_PATTERN``), "" for the full weights."""


class WeightsFetch(Message, kw_only=True):
    """Inference worker -> trainer: send bucket ``bucket`` of ``step``.

    Version 2 added ``base_step``: a replica may ask for deltas against the step it holds.
    Version 3 added ``adapter``: runs sharing a trainer publish the same step numbers, so a step
    is named by adapter and number (a version-2 trainer would serve whichever it held)."""

    VERSION: ClassVar[int] = 3

    replica_id: str
    step: int
    bucket: int
    nonce: int = 0
    """Echoed in the ``WeightsBucket``, so a late reply to an earlier request is told apart
    (0: a peer that predates it; such replies are matched by step and bucket only)."""
    base_step: int | None = None
    """The step whose tensors the replica holds, verified: the trainer may then send deltas
    against it (delta mode). None: send the tensors in full."""
    adapter: str = ""
    """Whose step: the announcement's ``lora.name``, "" for the full weights."""


class WeightsBucket(Message, kw_only=True):
    """Trainer -> inference worker: the tensors of one bucket.

    Version 2 added ``chunks`` (a large tensor travels as several frames, so the receiver reuses
    its memory instead of faulting in fresh pages for each tensor), ``base_step`` and ``encodings``
    (delta mode, ``rlbus.weight_codec``)."""

    VERSION: ClassVar[int] = 2

    step: int
    bucket: int
    names: list[str]
    tensors: list[np.ndarray]
    """Tensors in ``names`` order, each travelling as its own frame(s): raw, or as ``encodings`` says."""
    nonce: int = 0
    """The ``WeightsFetch.nonce`` this answers."""
    chunks: list[int] = []
    """How many consecutive ``tensors`` entries each name spans, in ``names`` order: 1-D pieces of
    the flattened tensor, in order; empty: one entry each."""
    base_step: int | None = None
    """The step the ``xor-zstd`` tensors are deltas against (the request's ``base_step``); None
    when every tensor is raw."""
    encodings: list[Literal["raw", "xor-zstd"]] = []
    """How each tensor travels, in ``names`` order; empty: all ``raw``. ``xor-zstd``: a uint8
    array, the zstd-compressed XOR with the same tensor of ``base_step`` (``rlbus.weight_codec``)."""


class PolicyLoaded(Message, kw_only=True):
    """Inference replica -> orchestrator: I now serve ``step``.

    Repeated every heartbeat so a restarted orchestrator learns it again;
    the orchestrator replies with ``Ack``.
    """

    replica_id: str
    base_url: str
    step: int
    loaded_at: float
