"""Messages of the runs channel: run orchestrators joining and leaving a shared trainer.

A trainer started with ``trainer.max_concurrent_runs`` trains several runs at once, each with its
own LoRA adapter, optimizer and progress. Each run's orchestrator announces itself on the trainer's
``trainer_runs`` ROUTER (the orchestrator connects a DEALER); the trainer then connects to the
run's batch ROUTER and pulls its batches with the usual batch protocol.

Refusals (a run id held by another run, a bad spec) are the generic ``Refused`` with
``request="RunJoin"`` or ``"RunLeave"``. The structs carry no validation: the trainer checks what
it receives (``RunSpec.model_validate``, ``run_id_problem``) and refuses with the reason.

:mod:`rlbus.messages` re-exports everything here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rlbus.messages_base import Message

# --------------------------------------------------------------------------
# Runs: run orchestrator (DEALER) <-> shared trainer (ROUTER, binds)
# --------------------------------------------------------------------------


class RunJoin(Message, kw_only=True):
    """Run orchestrator -> shared trainer: train this run alongside the others.

    Resent every ``bus.request_timeout_s`` until a ``RunJoined`` or ``Refused`` comes back.
    The same ``run_id`` with the same ``token`` is the same run restarting (the trainer keeps its
    progress); the same ``run_id`` with another ``token`` is a collision and is refused.
    """

    REF_FIELD: ClassVar[str | None] = "nonce"

    run_id: str
    """The run's name: its adapter's name and the tag of its metrics."""
    token: str
    """Random hex the orchestrator creates once and keeps in ``<output_dir>/orchestrator/run_token``:
    proof that a re-join comes from the same run."""
    spec: dict[str, Any]
    """The run's ``RunSpec`` as JSON (LoRA, optimizer, scheduler, loss, max_steps, seed); the
    trainer validates it and refuses with the validation error."""
    batches_address: str
    """The run orchestrator's batch ROUTER, which the trainer connects to for this run's batches."""
    monitor_address: str = ""
    """The run's monitor telemetry endpoint, where the trainer reports this run's metrics; "" =
    the trainer's own monitor."""
    nonce: str
    """Request id, echoed in the reply so a late reply to an older attempt is told apart."""


class RunJoined(Message, kw_only=True):
    """Shared trainer -> run orchestrator: the run is in; its batches are pulled from now on."""

    REF_FIELD: ClassVar[str | None] = "nonce"

    run_id: str
    nonce: str
    """The ``nonce`` of the ``RunJoin`` answered."""
    step: int
    """Last step the trainer has applied for this run: 0 when fresh, N when the trainer resumed the
    run from its own per-run checkpoint or kept it across an orchestrator restart."""


class RunLeave(Message, kw_only=True):
    """Run orchestrator -> shared trainer when the run is done: checkpoint it and free its slot.

    Answered with ``Ack(ref=nonce)``, or ``Refused`` when ``token`` is not the run's.
    """

    REF_FIELD: ClassVar[str | None] = "nonce"

    run_id: str
    token: str
    """The token the run joined with."""
    nonce: str
    """Request id, echoed as the ``Ack``'s ``ref``."""
