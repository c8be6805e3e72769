"""The codec: round trips of every message, plain msgpack, and clear decode errors."""

import zlib

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlbus.codec import DecodeError, decode, encode, peek_type
from rlbus.messages import ALL_MESSAGES, Heartbeat, MicroBatch, Refused, TrainBatch, WeightsBucket

from .message_strategies import any_message, comparable, structs

MESSAGES = any_message(ALL_MESSAGES)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PER_TYPE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EACH_TYPE = pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda cls: cls.__name__)


@EACH_TYPE
@PER_TYPE
@given(data=st.data())
def test_every_message_round_trips(cls, data):
    message = data.draw(structs(cls))
    frames = encode(message)
    assert comparable(decode(frames, cls)) == comparable(message)
    assert comparable(decode([bytes(f) for f in frames])) == comparable(message)


@EACH_TYPE
@PER_TYPE
@given(data=st.data())
def test_plain_msgpack_reads_envelope_and_body(cls, data):
    message = data.draw(structs(cls))
    envelope, body, *buffers = encode(message)
    name, version, num_buffers = msgpack.unpackb(envelope)
    assert (name, version, num_buffers) == (type(message).__name__, message.VERSION, len(buffers))
    fields = msgpack.unpackb(bytes(body), raw=False, strict_map_key=False)
    assert set(fields) == set(message.__struct_fields__)


@EACH_TYPE
@PER_TYPE
@given(data=st.data())
def test_truncated_body_is_a_decode_error(cls, data):
    message = data.draw(structs(cls))
    envelope, body, *buffers = encode(message)
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(DecodeError, match=type(message).__name__):
        decode([envelope, bytes(body)[:cut], *buffers])


@FAST
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames_never_raise_anything_but_decode_error(frames):
    try:
        decode(frames)
    except DecodeError:
        pass


@FAST
@given(MESSAGES, st.integers(0, 3), st.binary(max_size=16))
def test_corrupted_frame_bytes_raise_only_decode_error(message, index, garbage):
    frames = [bytes(f) for f in encode(message)]
    index = min(index, len(frames) - 1)
    frames[index] = garbage + frames[index][len(garbage):] if garbage else frames[index][:-1]
    try:
        decode(frames)
    except DecodeError:
        pass


def test_wrong_version_is_refused_by_name():
    frames = encode(Heartbeat(service="s", replica_id="r", host="h", pid=1, started_at=0.0, sent_at=0.0))
    frames[0] = msgpack.packb(["Heartbeat", 99, 0])
    with pytest.raises(DecodeError, match=r"Heartbeat: schema version 99 not supported \(this build reads version 1\)"):
        decode(frames)


def test_a_refusal_from_a_version_1_peer_is_refused_loudly():
    """Refused v2 carries ``next_step``; a v1 peer's refusal (reason text only) is not misread."""
    frames = [msgpack.packb(["Refused", 1, 0]), msgpack.packb({"request": "BatchRequest", "reason": "the next step is 3"})]
    with pytest.raises(DecodeError, match=r"Refused: schema version 1 not supported \(this build reads version 2\)"):
        decode(frames)
    refused = decode(encode(Refused(request="BatchRequest", reason="trained", next_step=3)))
    assert isinstance(refused, Refused) and refused.next_step == 3


def test_unknown_type_and_unexpected_type_are_named():
    with pytest.raises(DecodeError, match="unknown message type 'Nope'"):
        decode([msgpack.packb(["Nope", 1, 0]), msgpack.packb({})])
    frames = encode(Heartbeat(service="s", replica_id="r", host="h", pid=1, started_at=0.0, sent_at=0.0))
    assert peek_type(frames) == "Heartbeat"
    with pytest.raises(DecodeError, match="unexpected message Heartbeat here; expected TrainBatch"):
        decode(frames, TrainBatch)


def weights(num: int = 2, size: int = 1000) -> WeightsBucket:
    tensors = [np.arange(size, dtype=np.float32) + i for i in range(num)]
    return WeightsBucket(step=3, bucket=0, names=[f"w{i}" for i in range(num)], tensors=tensors)


def test_arrays_travel_as_raw_frames_and_decode_without_copy():
    message = weights()
    frames = encode(message)
    assert len(frames) == 4
    assert bytes(frames[2]) == message.tensors[0].tobytes()
    received = [bytearray(f) for f in frames]
    decoded = decode(received)
    assert np.shares_memory(decoded.tensors[1], np.frombuffer(received[3], dtype=np.uint8))
    assert zlib.crc32(decoded.tensors[1]) == zlib.crc32(message.tensors[1])


def test_buffer_mismatches_are_named():
    frames = encode(weights())
    with pytest.raises(DecodeError, match="envelope promises 2 buffers but 1 arrived"):
        decode(frames[:-1])
    with pytest.raises(DecodeError, match="buffer 1 holds 3996 bytes, but a float32 array of shape \\[1000\\] needs 4000"):
        decode([*frames[:3], bytes(frames[3])[:-4]])
    frames[0] = msgpack.packb(["WeightsBucket", WeightsBucket.VERSION, 3])
    with pytest.raises(DecodeError, match=r"buffers \[2\] are not referenced by the body"):
        decode([*frames, b"extra"])


def rejected(frames, reason: str, match: str, **limits) -> DecodeError:
    """The DecodeError ``frames`` raise, checked for its text and its reason label."""
    with pytest.raises(DecodeError, match=match) as info:
        decode(frames, **limits)
    assert info.value.reason == reason, info.value
    return info.value


def test_limit_on_frames_per_message():
    frames = encode(weights(num=3))
    rejected(frames, "too_many_frames", "5 frames, more than the limit of 4", max_frames=4)
    assert len(decode(frames, max_frames=5).tensors) == 3


def test_limit_on_header_bytes_counts_envelope_and_body():
    frames = encode(weights(num=3))
    header = len(frames[0]) + len(frames[1])
    rejected(frames, "header_too_large", f"envelope and body of {header} bytes exceed the limit of {header - 1}",
             max_header_bytes=header - 1)  # fmt: skip
    decode(frames, max_header_bytes=header)


def test_limits_on_one_buffer_and_on_the_whole_payload():
    frames = encode(weights(num=3))
    rejected(frames, "payload_too_large", "buffer 0 of 4000 bytes exceeds the limit of 100", max_frame_bytes=100)
    rejected(frames, "payload_too_large", "3 buffers of 12000 bytes in all exceed the limit of 11999",
             max_payload_bytes=11999)  # fmt: skip
    decode(frames, max_frame_bytes=4000, max_payload_bytes=12000)


def test_limits_are_checked_before_the_body_is_parsed():
    # A body that would fail to parse still fails on the size limit first: nothing is decoded.
    frames = [*encode(weights(num=1))[:1], b"\xff" * 200, b"\0" * 4000]
    rejected(frames, "header_too_large", "exceed the limit of 100", max_header_bytes=100)
    rejected(frames, "payload_too_large", "exceeds the limit of 10", max_frame_bytes=10)


def placeholder(dtype: str, shape: list, index: int = 0) -> dict:
    return {"__ndarray__": index, "dtype": dtype, "shape": shape}


def bucket_frames(tensor: dict, *buffers: bytes) -> list[bytes]:
    """WeightsBucket frames with a hand-written array placeholder, as a hostile peer would send them."""
    body = msgpack.packb({"step": 1, "bucket": 0, "names": ["w"], "tensors": [tensor]})
    return [msgpack.packb(["WeightsBucket", WeightsBucket.VERSION, len(buffers)]), body, *buffers]


@pytest.mark.parametrize(
    ("tensor", "buffers", "match"),
    [
        (placeholder("float32", [2**32, 2**32]), [b""], "shape \\[4294967296, 4294967296\\] needs"),
        (placeholder("float32", [2**62, 4]), [b"\0" * 16], "needs 73786976294838206464"),
        (placeholder("float32", [-1, 4]), [b"\0" * 16], "not a list of non-negative ints"),
        (placeholder("float32", [1] * 40), [b"\0" * 4], "40 dimensions, more than 32"),
        (placeholder("object", [1]), [b"\0" * 8], "dtype 'object' is not one of"),
        (placeholder("float32", [3]), [b"\0" * 8], "buffer 0 holds 8 bytes, but a float32 array of shape \\[3\\] needs 12"),
        (placeholder("float32", [1], index=5), [b"\0" * 4], "points at buffer 5, but the message has 1"),
        ({"__ndarray__": 0, "dtype": "float32"}, [b"\0" * 4], "expected an array placeholder"),
    ],
    ids=["wrapping-shape", "huge-shape", "negative-dim", "too-many-dims", "unknown-dtype", "size-mismatch",
         "bad-index", "missing-shape"],
)
def test_array_headers_are_checked_against_their_frames(tensor, buffers, match):
    rejected(bucket_frames(tensor, *buffers), "bad_array", match)


def test_a_buffer_used_by_two_arrays_is_refused():
    body = msgpack.packb({"step": 1, "bucket": 0, "names": ["a", "b"],
                          "tensors": [placeholder("uint8", [2]), placeholder("uint8", [2])]})  # fmt: skip
    frames = [msgpack.packb(["WeightsBucket", WeightsBucket.VERSION, 1]), body, b"ab"]
    rejected(frames, "bad_array", "buffer 0 is referenced by two arrays")


def test_reasons_name_each_kind_of_problem():
    good = encode(Heartbeat(service="s", replica_id="r", host="h", pid=1, started_at=0.0, sent_at=0.0))
    rejected([good[0]], "too_few_frames", "at least envelope and body")
    rejected([b"\xc1", good[1]], "bad_envelope", "frame 0 is not an rlbus envelope")
    rejected([msgpack.packb(["Nope", 1, 0]), b""], "unknown_type", "unknown message type 'Nope'")
    rejected([msgpack.packb(["Heartbeat", 7, 0]), good[1]], "unsupported_version", "schema version 7")
    rejected([*good, b"x"], "buffer_count", "envelope promises 0 buffers but 1 arrived")
    rejected([good[0], bytes(good[1])[:-3]], "bad_body", "Heartbeat: invalid body")
    with pytest.raises(DecodeError, match="unexpected message Heartbeat") as info:
        decode(good, TrainBatch)
    assert info.value.reason == "unexpected_type"


def test_micro_batch_arrays_keep_dtype_and_shape():
    length = 7
    micro = MicroBatch(
        input_ids=np.arange(length, dtype=np.int32), position_ids=np.arange(length, dtype=np.int32),
        loss_mask=np.array([0, 1, 1, 0, 1, 1, 1], dtype=bool), advantages=np.full(length, 0.5, np.float32),
        inference_logprobs=np.linspace(-1, 0, length, dtype=np.float32), temperatures=np.ones(length, np.float32),
    )
    batch = TrainBatch(step=1, rank=0, world_size=1, micro_batches=[micro, micro], num_loss_tokens=10)
    decoded = decode(encode(batch), TrainBatch)
    got = decoded.micro_batches[1]
    assert got.loss_mask.dtype == np.bool_ and got.loss_mask.tolist() == micro.loss_mask.tolist()
    assert got.input_ids.dtype == np.int32 and got.input_ids.shape == (length,)


def test_unsupported_array_dtype_is_refused_when_sending():
    bucket = WeightsBucket(step=0, bucket=0, names=["c"], tensors=[np.zeros(2, dtype=np.complex64)])
    with pytest.raises(TypeError, match="cannot send arrays of dtype complex64"):
        encode(bucket)


def test_a_result_that_does_not_decode_still_names_its_task_so_it_can_be_refused():
    from rlbus.messages import Ack, RolloutResult

    frames = encode(RolloutResult(task_id="run-7", worker_id="w", env_id="e", example_id=1, rollouts=[]))
    body = msgpack.unpackb(bytes(frames[1])) | {"example_id": "seven"}
    with pytest.raises(DecodeError) as caught:
        decode([frames[0], msgpack.packb(body)])
    assert (caught.value.message_type, caught.value.ref) == ("RolloutResult", "run-7")
    for hostile in ({"task_id": "x" * 10_000}, {"task_id": 7}, {"task_id": None}):
        with pytest.raises(DecodeError) as caught:
            decode([frames[0], msgpack.packb(body | hostile)])
        assert caught.value.ref is None  # no reference to answer about: counted and dropped only
    with pytest.raises(DecodeError) as caught:  # messages without a reference field never get one
        decode([encode(Ack(ref="r"))[0], msgpack.packb({"ref": 5})])
    assert caught.value.message_type == "Ack" and caught.value.ref is None


def test_a_result_over_the_size_limits_still_names_its_task_so_it_can_be_refused():
    from rlbus.messages import Rollout, RolloutResult

    big = RolloutResult(task_id="run-8", worker_id="w", env_id="e", example_id=1,
                        rollouts=[Rollout(rollout_id=str(i), turns=[], reward=0.0) for i in range(100)])  # fmt: skip
    frames = [bytes(f) for f in encode(big)]
    error = rejected(frames, "header_too_large", "exceed the limit of 1024", max_header_bytes=1024)
    assert (error.message_type, error.ref) == ("RolloutResult", "run-8")
    error = rejected([*frames, b"x", b"y"], "too_many_frames", "more than the limit of 3", max_frames=3)
    assert (error.message_type, error.ref) == ("RolloutResult", "run-8")
    # An envelope too long to be one is not read at all.
    error = rejected([b"\x93" + b"\xa1" * 300, frames[1]], "header_too_large", "exceed", max_header_bytes=1024)
    assert (error.message_type, error.ref) == (None, None)
