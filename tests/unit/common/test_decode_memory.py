"""Memory a decode may allocate: a bounded multiple of the msgpack part, nothing for array frames.

The limits (``max_header_bytes``, ``max_payload_bytes``) bound what a peer may send; this
bounds what one message at those limits costs the receiver. The bodies below are crafted the
way a hostile peer would, to get the most Python objects out of the fewest bytes: one-byte
negative ints (each a new 28-byte int plus an 8-byte list slot), one-byte ints where floats
are expected, short distinct dict keys, minimal nested structs. Measured with tracemalloc
(msgspec and numpy allocate through Python's allocators, which it traces).
"""

import itertools
import string
import tracemalloc

import msgpack
import numpy as np
import pytest

from rlbus.codec import MESSAGE_TYPES, decode, encode
from rlbus.messages import WeightsBucket

LIMIT = 2**18  # max_header_bytes and max_payload_bytes of these tests
# Worst measured: 40x (negative fixints, 1 byte each on the wire, 36 bytes each decoded).
MAX_EXPANSION = 48
ARRAY_OVERHEAD_BYTES = 16 * 1024  # array frames are viewed, not copied: a constant, whatever their size


def keys(count: int) -> list[str]:
    """``count`` distinct keys, shortest first."""
    every = itertools.chain.from_iterable(itertools.product(string.ascii_letters, repeat=r) for r in range(1, 5))
    return ["".join(p) for p in itertools.islice(every, count)]


def turn(**fields) -> dict:
    return {"prompt_ids": [], "completion_ids": [], "completion_logprobs": [], "completion_mask": [],
            "policy_step": 0, **fields}  # fmt: skip


def result(**turn_fields) -> dict:
    rollout = {"rollout_id": "r", "reward": 0, "turns": [turn(**turn_fields)]}
    return {"task_id": "t", "worker_id": "w", "env_id": "a", "example_id": 0, "rollouts": [rollout]}


def fill(make, size: int = LIMIT - 256) -> dict:
    """``make(n)`` with the largest ``n`` whose msgpack body still fits in ``size`` bytes."""
    low, high = 0, size
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(msgpack.packb(make(mid))) <= size else (low, mid - 1)
    return make(low)


WORST_BODIES = {
    "negative_token_ids": ("RolloutResult", lambda n: result(prompt_ids=[-20] * n)),
    "large_token_ids": ("RolloutResult", lambda n: result(prompt_ids=[1000] * n)),
    "ints_as_float_logprobs": ("RolloutResult", lambda n: result(completion_logprobs=[-20] * n)),
    "empty_strings": ("TaskRequest", lambda n: {"worker_id": "w", "num_tasks": 1, "env_ids": [""] * n}),
    "short_metric_keys": ("MetricsReport", lambda n: {"service": "s", "replica_id": "r", "step": 1, "sent_at": 0,
                                                      "metrics": dict.fromkeys(keys(n), -20)}),
    "event_fields": ("Event", lambda n: {"service": "s", "replica_id": "r", "sent_at": 0, "kind": "k",
                                         "message": "m", "fields": dict.fromkeys(keys(n), -20)}),
    "minimal_rollouts": ("RolloutResult", lambda n: {"task_id": "t", "worker_id": "w", "env_id": "a", "example_id": 0,
                                                     "rollouts": [{"rollout_id": "", "reward": 0, "turns": []}] * n}),
    "empty_turns": ("RolloutResult", lambda n: {"task_id": "t", "worker_id": "w", "env_id": "a", "example_id": 0,
                                                "rollouts": [{"rollout_id": "", "reward": 0, "turns": [turn()] * n}]}),
}  # fmt: skip


def peak_bytes_of_decode(frames: list[bytes], **limits: int) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        message = decode(frames, **limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message is not None
    return peak


@pytest.mark.parametrize("case", list(WORST_BODIES))
def test_decoding_a_body_at_the_header_limit_allocates_a_bounded_multiple_of_it(case):
    name, make = WORST_BODIES[case]
    frames = [msgpack.packb([name, MESSAGE_TYPES[name].VERSION, 0]), msgpack.packb(fill(make))]
    size = sum(map(len, frames))
    assert LIMIT - 1024 < size <= LIMIT  # at the limit, and accepted by it
    peak = peak_bytes_of_decode(frames, max_header_bytes=LIMIT)
    assert peak <= MAX_EXPANSION * size, (
        f"{case}: {peak} bytes allocated for a {size}-byte message ({peak / size:.1f}x)"
    )


def test_decoding_arrays_at_the_payload_limit_allocates_next_to_nothing():
    # 8 buffers of LIMIT / 8 bytes: at max_payload_bytes, viewed in place.
    bucket = WeightsBucket(step=1, bucket=0, names=list("abcdefgh"), tensors=[np.ones(LIMIT // 8, np.uint8)] * 8)
    frames = [bytes(f) for f in encode(bucket)]
    assert sum(map(len, frames[2:])) == LIMIT
    peak = peak_bytes_of_decode(frames, max_payload_bytes=LIMIT, max_frame_bytes=LIMIT)
    assert peak <= ARRAY_OVERHEAD_BYTES, f"{peak} bytes allocated to decode {LIMIT} bytes of arrays"
