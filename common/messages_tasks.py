"""Messages of the task channel: rollout tasks out to env-workers, their scored results back.

:mod:`rlbus.messages` re-exports everything here.
"""

# ruff: noqa: RUF012 - msgspec copies a mutable default for each instance; ruff sees that only in
# direct subclasses of msgspec.Struct, not in those of Message and Payload.

from __future__ import annotations

from typing import ClassVar, Literal

from rlbus.messages_base import Message, Payload, Scalar

# --------------------------------------------------------------------------
# Tasks: orchestrator (ROUTER, binds) <-> env-workers (DEALER, connect)
# --------------------------------------------------------------------------


class SamplingParams(Payload, kw_only=True):
    """How the env-worker asks inference to sample."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    """Completion tokens per turn."""
    stop: list[str] = []
    seed: int | None = None


class TaskRequest(Message, kw_only=True):
    """Env-worker -> orchestrator: I can take ``num_tasks`` more tasks.

    Credit-based flow control: the orchestrator never sends a worker more
    tasks than it asked for, so a slow worker is never flooded.
    """

    worker_id: str
    num_tasks: int
    env_ids: list[str] = []
    """Environments this worker can run; empty means all installed."""


class RolloutTask(Message, kw_only=True):
    """Orchestrator -> env-worker: roll out one example ``num_rollouts`` times.

    The task is leased: if no ``RolloutResult`` arrives within ``lease_s``
    seconds the orchestrator issues it again, and drops a late duplicate by
    ``task_id``. Version 2 added ``training_mode``.
    """

    VERSION: ClassVar[int] = 2

    task_id: str
    env_id: str
    env_args: dict[str, Scalar] = {}
    example_id: int
    """Index of the example in the environment's dataset."""
    num_rollouts: int
    """Group size: rollouts of the same example, scored together."""
    sampling: SamplingParams
    is_eval: bool = False
    lease_s: float
    issued_at: float
    min_policy_step: int = 0
    """Inference replicas serving an older step must not be used."""
    training_mode: Literal["rl", "opd", "sft"] = "rl"
    """``rl``: the policy samples; ``opd``: the policy samples, then the teacher scores every
    completion token (``Turn.teacher_logprobs``); ``sft``: the teacher samples (the env-worker's
    ``[env_worker.teacher]``). Eval tasks are always ``rl``. See ``rlbus.teacher``."""


class Turn(Payload, kw_only=True):
    """One model turn of a rollout, token-in/token-out.

    A rollout's token sequence is the concatenation over turns of
    ``prompt_ids + completion_ids``; a later turn's ``prompt_ids`` holds only
    the new tokens (environment reply, tool result), never a re-tokenised
    history. A turn with ``starts_sequence`` begins another sequence of the same
    rollout (a harness that summarised or forked its history): its
    ``prompt_ids`` are that sequence's whole prompt, and each sequence trains
    as a sample of its own with the rollout's advantage.
    """

    prompt_ids: list[int]
    """[P] tokens added before this completion (whole prompt on turn 0)."""
    completion_ids: list[int]
    """[C] tokens sampled by the policy."""
    completion_logprobs: list[float]
    """[C] sampling logprob of each completion token (finite, at most ``MAX_LOGPROB``)."""
    completion_mask: list[bool]
    """[C] True where the token is trained on (policy-produced and kept)."""
    policy_step: int
    """Policy step of the weights that sampled this turn (0 for a teacher's turn)."""
    finish_reason: str = "stop"
    teacher_logprobs: list[float] | None = None
    """[C] the teacher's logprob of each completion token in its context (``opd`` tasks only; finite,
    at most ``MAX_LOGPROB``); None when no teacher scored the turn."""
    starts_sequence: bool = False
    """This turn begins a new token sequence of the rollout (``rl`` tasks only; the first turn always
    does)."""


class Rollout(Payload, kw_only=True):
    """One scored rollout, sent back inside a ``RolloutResult``."""

    rollout_id: str
    turns: list[Turn]
    reward: float
    reward_breakdown: dict[str, float] = {}
    """Unweighted value of each reward function."""
    metrics: dict[str, float] = {}
    is_truncated: bool = False
    error: str | None = None
    """Set when the environment failed; the rollout is then not trained on."""
    prompt_text: str = ""
    completion_text: str = ""
    timing: dict[str, float] = {}
    """Seconds spent per phase, e.g. ``generate``, ``score``."""
    answer: str | None = None
    """The example's reference answer as text (for people: samples.jsonl); None when it has none."""


class RolloutResult(Message, kw_only=True):
    """Env-worker -> orchestrator: the scored group of one ``RolloutTask``.

    The worker keeps the result until a ``ResultAck`` arrives and sends it
    again after reconnecting, so an orchestrator restart loses nothing.
    Version 2 added ``Rollout.answer``, version 3 ``Turn.teacher_logprobs``, version 4
    ``Turn.starts_sequence`` (journals of older versions still read: each has a default).
    """

    VERSION: ClassVar[int] = 4
    REF_FIELD: ClassVar[str | None] = "task_id"

    task_id: str
    worker_id: str
    env_id: str
    example_id: int
    is_eval: bool = False
    rollouts: list[Rollout]


class ResultAck(Message, kw_only=True):
    """Orchestrator -> env-worker: these results are stored (or refused)."""

    task_ids: list[str]
    accepted: bool = True
    reason: str = ""
