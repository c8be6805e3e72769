"""Messages of the batch channel: packed training batches from the orchestrator to trainer ranks.

:mod:`rlbus.messages` re-exports everything here.
"""

# ruff: noqa: RUF012 - msgspec copies a mutable default for each instance; ruff sees that only in
# direct subclasses of msgspec.Struct, not in those of Message and Payload.

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from rlbus.messages_base import Message, Payload

# --------------------------------------------------------------------------
# Training batches: orchestrator (ROUTER, binds) <-> trainer ranks (DEALER)
# --------------------------------------------------------------------------


class MicroBatch(Payload, kw_only=True):
    """Samples packed into one row of at most ``seq_len`` tokens.

    Sample boundaries are where ``position_ids`` restart at 0. All arrays
    have the same length L.
    """

    input_ids: np.ndarray
    """[L] int32 token ids."""
    position_ids: np.ndarray
    """[L] int32 position within each packed sample."""
    loss_mask: np.ndarray
    """[L] bool, True on tokens the loss is taken over."""
    advantages: np.ndarray
    """[L] float32 advantage of each token: the sample's, copied to each of its tokens; in ``opd``
    the teacher's logprob minus the sampling logprob of each token (plus a share of the sample's)."""
    inference_logprobs: np.ndarray
    """[L] float32 sampling logprob of each token (0 where masked)."""
    temperatures: np.ndarray
    """[L] float32 sampling temperature of each token."""


class BatchRequest(Message, kw_only=True):
    """Trainer rank -> orchestrator: send me my share of step ``step``."""

    trainer_id: str
    rank: int
    world_size: int
    step: int


class TrainBatch(Message, kw_only=True):
    """Orchestrator -> trainer rank: one rank's micro-batches of one step.

    Every rank of a step gets the same number of micro-batches (padded with
    zero-loss ones) so collectives never deadlock. Version 2 added ``task_ids``, version 3
    ``training_mode``.
    """

    VERSION: ClassVar[int] = 3

    step: int
    rank: int
    world_size: int
    micro_batches: list[MicroBatch]
    num_loss_tokens: int
    """Loss tokens over all ranks: the loss normaliser."""
    metrics: dict[str, float] = {}
    task_ids: list[str] = []
    """Task ids of the groups the step was built from (all of them, on every rank): the
    trainer's audit trail names what it trained (``rlbus.audit``)."""
    training_mode: Literal["rl", "opd", "sft"] = "rl"
    """Which loss the trainer applies: the policy-gradient loss (``trainer.loss``) for ``rl`` and
    ``opd`` (whose per-token advantages pull towards the teacher), the negative log-likelihood of
    the loss tokens for ``sft``."""


class BatchAck(Message, kw_only=True):
    """Trainer -> orchestrator after the optimizer step of ``step`` applied.

    ``ok=False`` is a negative acknowledgement: the batch was rejected for
    ``reason`` and will not be trained.
    """

    trainer_id: str
    step: int
    ok: bool = True
    reason: str = ""
