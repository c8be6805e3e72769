"""Every message that crosses the rlbus bus, for every channel.

Each message is a typed msgspec struct with a schema ``VERSION``. The codec
(:mod:`rlbus.codec`) sends the type name and version in a small envelope
frame, the fields as a plain msgpack map, and numpy arrays as raw extra
frames. Adding, removing or retyping a field means bumping ``VERSION``:
receivers refuse versions they do not speak instead of misreading them.

Channels, socket patterns and delivery guarantees are described in
``docs/protocol.md``; each class says who sends it to whom. The classes live in one module per
channel (``messages_tasks``, ``messages_batches``, ``messages_weights``, ``messages_monitor``, ``messages_runs``, with
the base classes and generic replies in ``messages_base``); import them from here.
Times are UNIX seconds (float) unless a name says otherwise.
"""

from __future__ import annotations

from rlbus.messages_base import MAX_ABS_REWARD, MAX_LOGPROB, Ack, Hello, Message, Payload, Refused, Scalar
from rlbus.messages_batches import BatchAck, BatchRequest, MicroBatch, TrainBatch
from rlbus.messages_monitor import (
    Event,
    Heartbeat,
    MetricsReport,
    RolloutSamples,
    Sample,
    ServiceHealth,
    ViewRequest,
    ViewSnapshot,
)
from rlbus.messages_runs import RunJoin, RunJoined, RunLeave
from rlbus.messages_tasks import (
    ResultAck,
    Rollout,
    RolloutResult,
    RolloutTask,
    SamplingParams,
    TaskRequest,
    Turn,
)
from rlbus.messages_weights import (
    ADAPTER_NAME_PATTERN,
    LoraAdapterMeta,
    PolicyLoaded,
    TensorMeta,
    WeightsAnnounced,
    WeightsBucket,
    WeightsFetch,
    WeightsQuery,
)

__all__ = [
    "ADAPTER_NAME_PATTERN",
    "ALL_MESSAGES",
    "MAX_ABS_REWARD",
    "MAX_LOGPROB",
    "Ack",
    "BatchAck",
    "BatchRequest",
    "Event",
    "Heartbeat",
    "Hello",
    "LoraAdapterMeta",
    "Message",
    "MetricsReport",
    "MicroBatch",
    "Payload",
    "PolicyLoaded",
    "Refused",
    "ResultAck",
    "Rollout",
    "RolloutResult",
    "RolloutSamples",
    "RolloutTask",
    "RunJoin",
    "RunJoined",
    "RunLeave",
    "Sample",
    "SamplingParams",
    "Scalar",
    "ServiceHealth",
    "TaskRequest",
    "TensorMeta",
    "TrainBatch",
    "Turn",
    "ViewRequest",
    "ViewSnapshot",
    "WeightsAnnounced",
    "WeightsBucket",
    "WeightsFetch",
    "WeightsQuery",
]  # fmt: skip

ALL_MESSAGES: tuple[type[Message], ...] = (
    Hello, Ack, Refused,
    Heartbeat, MetricsReport, Event, RolloutSamples,
    TaskRequest, RolloutTask, RolloutResult, ResultAck,
    BatchRequest, TrainBatch, BatchAck,
    WeightsAnnounced, WeightsQuery, WeightsFetch, WeightsBucket, PolicyLoaded,
    ViewRequest, ViewSnapshot,
    RunJoin, RunJoined, RunLeave,
)  # fmt: skip
