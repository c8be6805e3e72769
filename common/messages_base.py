"""The base of every bus message, and the replies any request/reply channel uses.

:mod:`rlbus.messages` re-exports everything here; see its docstring for the versioning rules.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

Scalar = str | int | float | bool | None
MAX_LOGPROB = 1e-3
"""Highest sampling logprob a receiver accepts: logprobs are <= 0, up to the sampler's float noise.
The orchestrator checks rollouts and the trainer checks batches against this one value."""
MAX_ABS_REWARD = 1e6
"""Largest reward magnitude accepted: rewards become float32 advantages, and one huge reward
(1e39 is finite in float64, inf in float32) would poison the whole step it lands in."""


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every bus message; subclasses set ``VERSION``."""

    VERSION: ClassVar[int] = 1
    REF_FIELD: ClassVar[str | None] = None
    """A string field naming what the message is about (a result's ``task_id``): a receiver
    that cannot decode the rest can still answer about it (see ``rlbus.codec.DecodeError.ref``)."""


class Payload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A struct nested inside messages; versioned by the message that holds it."""


# --------------------------------------------------------------------------
# Generic replies and handshakes (any request/reply channel)
# --------------------------------------------------------------------------


class Hello(Message, kw_only=True):
    """Publisher -> subscribers on connect, and worker <-> server greetings.

    A subscriber treats the first ``Hello`` it receives as proof that its
    subscription is live (the readiness handshake of pub/sub channels).
    """

    sender: str
    nonce: int = 0


class Ack(Message, kw_only=True):
    """Reply to any request that only needs a receipt (e.g. ``PolicyLoaded``)."""

    ref: str
    """What is acknowledged, e.g. a request id or ``"policy:12"``."""


class Refused(Message, kw_only=True):
    """Reply to a request that cannot be served, with the reason.

    Sent instead of the normal reply, e.g. a ``WeightsFetch`` for a step the
    trainer no longer holds or a ``BatchRequest`` for an already trained step.
    Version 2 added ``next_step``: what the requester acts on is a typed field,
    never the wording of ``reason``.
    """

    VERSION: ClassVar[int] = 2

    request: str
    """The type name of the refused request."""
    reason: str
    """Why, for people (logs); programs read the typed fields."""
    next_step: int | None = None
    """Orchestrator -> trainer, refusing a ``BatchRequest`` for an acknowledged step: the first step
    not trained yet, where the trainer continues. None in every other refusal."""
