"""Every message that crosses the rlbus bus, for every channel.

Each message is a typed msgspec struct with a schema ``VERSION``. The codec
(:mod:`rlbus.codec`) sends the type name and version in a small envelope
frame, the fields as a plain msgpack map, and numpy arrays as raw extra
frames. Adding, removing or retyping a field means bumping ``VERSION``:
receivers refuse versions they do not speak instead of misreading them.

Channels, socket patterns and delivery guarantees are described in
``docs/protocol.md``; each class below says who sends it to whom.
Times are UNIX seconds (float) unless a name says otherwise.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec
import numpy as np

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


# --------------------------------------------------------------------------
# Telemetry: every service -> monitor (PUSH -> PULL, never blocks the sender)
# --------------------------------------------------------------------------


class Heartbeat(Message, kw_only=True):
    """Any service -> monitor, every ``bus.heartbeat_interval_s``."""

    service: str
    """Service name: inference, trainer, orchestrator, env-worker, monitor."""
    replica_id: str
    """Unique per process, e.g. ``env-worker-1``."""
    host: str
    pid: int
    started_at: float
    sent_at: float
    status: Literal["starting", "ready", "busy", "waiting", "stopping"] = "ready"
    step: int | None = None
    """The service's current step (trainer step, served policy step, ...)."""
    waiting_for: str | None = None
    """What the service is blocked on, if anything (shown by the monitor)."""
    waiting_since: float | None = None


class MetricsReport(Message, kw_only=True):
    """Any service -> monitor, once per step: ``{name: value}``."""

    service: str
    replica_id: str
    step: int
    sent_at: float
    metrics: dict[str, float]
    """Flat names as users know them, e.g. ``loss/mean``, ``reward/all/mean``."""


class Event(Message, kw_only=True):
    """Any service -> monitor: something happened (started, failed, ...)."""

    service: str
    replica_id: str
    sent_at: float
    level: Literal["debug", "info", "warning", "error"] = "info"
    kind: str
    """Machine-readable kind, e.g. ``started``, ``decode_error``, ``finished``."""
    message: str
    fields: dict[str, Scalar] = {}


class Sample(Payload, kw_only=True):
    """One rollout shown to humans (console, JSONL, W&B tables)."""

    env_id: str
    prompt: str
    completion: str
    reward: float
    advantage: float = 0.0
    answer: str | None = None
    """The example's reference answer, as text; None when the environment has none."""
    finish_reason: str = ""
    """Why the last turn ended: ``stop``, ``length`` (cut at ``max_tokens`` or the context), ...;
    ``error`` when the rollout errored."""
    num_prompt_tokens: int = 0
    """Tokens not sampled by the policy: the prompt plus environment replies of later turns."""
    num_completion_tokens: int = 0
    """Tokens sampled by the policy, over every turn."""
    policy_step: int = 0
    """The oldest policy step that sampled any turn of the rollout."""


class RolloutSamples(Message, kw_only=True):
    """Orchestrator -> monitor every ``samples_interval`` steps.

    Version 2 added the ``Sample`` fields after ``advantage``."""

    VERSION: ClassVar[int] = 2

    step: int
    samples: list[Sample]


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
    the other version by name instead, before anything is fetched.
    """

    VERSION: ClassVar[int] = 3

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


class WeightsQuery(Message, kw_only=True):
    """Inference -> trainer: which step is latest? (late joiners ask this)."""

    replica_id: str


class WeightsFetch(Message, kw_only=True):
    """Inference worker -> trainer: send bucket ``bucket`` of ``step``.

    Version 2 added ``base_step``: a replica may ask for deltas against the step it holds."""

    VERSION: ClassVar[int] = 2

    replica_id: str
    step: int
    bucket: int
    nonce: int = 0
    """Echoed in the ``WeightsBucket``, so a late reply to an earlier request is told apart
    (0: a peer that predates it; such replies are matched by step and bucket only)."""
    base_step: int | None = None
    """The step whose tensors the replica holds, verified: the trainer may then send deltas
    against it (delta mode). None: send the tensors in full."""


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


# --------------------------------------------------------------------------
# Live view: ``rlbus tail`` (DEALER) <-> monitor (ROUTER, binds)
# --------------------------------------------------------------------------


class ViewRequest(Message, kw_only=True):
    """``rlbus tail`` -> monitor: send the current state.

    Answered with ``ViewSnapshot``, or ``Refused`` when the monitor has a
    ``view_api_key`` and ``api_key`` does not match it.
    """

    VERSION: ClassVar[int] = 2

    log_offset: int = 0
    """Number of log lines already seen; only newer ones are returned."""
    api_key: str | None = None
    """The monitor's ``view_api_key``, when it has one."""


class ServiceHealth(Payload, kw_only=True):
    """One replica's row of the monitor's health table (from its heartbeats)."""

    service: str
    replica_id: str
    status: str
    """Last reported ``Heartbeat.status``, or ``dead`` / ``stopped`` as judged by the monitor."""
    alive: bool
    """False once no heartbeat arrived for the monitor's ``dead_after_s``."""
    last_seen: float
    """Monitor's clock when the last heartbeat arrived."""
    step: int | None = None
    waiting_for: str | None = None
    """What the replica is blocked on, if anything."""
    waiting_since: float | None = None
    """Sender's clock when the wait began."""
    host: str = ""
    pid: int = 0


class ViewSnapshot(Message, kw_only=True):
    """Monitor -> ``rlbus tail``: the latest step's metrics, health, logs.

    ``metrics`` are those of ``step``, merged over services (the mean where
    replicas of one service report the same name); ``log_lines`` are the
    monitor's log lines (service events, dead services, step summaries)
    after the request's ``log_offset``; ``log_offset`` is the count so far.
    """

    VERSION: ClassVar[int] = 2

    step: int | None
    metrics: dict[str, float]
    health: list[ServiceHealth]
    log_lines: list[str]
    log_offset: int
    sent_at: float = 0.0
    """Monitor's clock when sent: ``ServiceHealth.last_seen`` ages are relative to it."""


ALL_MESSAGES: tuple[type[Message], ...] = (
    Hello, Ack, Refused,
    Heartbeat, MetricsReport, Event, RolloutSamples,
    TaskRequest, RolloutTask, RolloutResult, ResultAck,
    BatchRequest, TrainBatch, BatchAck,
    WeightsAnnounced, WeightsQuery, WeightsFetch, WeightsBucket, PolicyLoaded,
    ViewRequest, ViewSnapshot,
)  # fmt: skip
