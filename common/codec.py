"""Encode and decode bus messages as plain msgpack plus raw array frames.

A message travels as ZeroMQ frames::

    frame 0   envelope: msgpack array [type name, schema version, number of buffers]
    frame 1   body: msgpack map of the message's fields
    frame 2+  one raw buffer per numpy array, in the order they appear in the body

In the body an array is a map ``{"__ndarray__": i, "dtype": "float32",
"shape": [2, 3]}`` pointing at buffer ``i``. Any msgpack library can read
frames 0 and 1; nothing is ever pickled. Arrays are sent without copying
and received as views of the frame (not copied: treat them as read-only).

Every problem with incoming frames raises :class:`DecodeError`, whose
message names the message type (when known), the frame and what was wrong.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from common.messages import ALL_MESSAGES, Message

ARRAY_KEY = "__ndarray__"
ALLOWED_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64".split()
)
DEFAULT_MAX_FRAMES = 4096
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_MAX_BUFFER_BYTES = 2 * 2**30

MESSAGE_TYPES: dict[str, type[Message]] = {cls.__name__: cls for cls in ALL_MESSAGES}

Frame = bytes | memoryview


class DecodeError(ValueError):
    """Incoming frames do not form a valid message; the reason is in the text."""


# Buffers of the message being encoded or decoded. msgspec hooks are fixed
# per Encoder/Decoder, so the per-message state lives in a thread-local.
_state = threading.local()


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in ALLOWED_DTYPES:
            raise TypeError(f"cannot send arrays of dtype {obj.dtype.name}")
        # ascontiguousarray would turn a 0-d array into 1-d; copy only when needed.
        array = obj if obj.flags.c_contiguous else obj.copy(order="C")
        buffers: list[memoryview] = _state.buffers
        buffers.append(array.reshape(-1).view(np.uint8).data)
        return {ARRAY_KEY: len(buffers) - 1, "dtype": array.dtype.name, "shape": list(array.shape)}
    raise TypeError(f"cannot encode objects of type {type(obj).__name__}")


def _dec_hook(expected: type, obj: Any) -> Any:
    if expected is np.ndarray:
        return _array_from_placeholder(obj)
    raise NotImplementedError(f"no decoder for {expected}")


def _array_from_placeholder(obj: Any) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {ARRAY_KEY, "dtype", "shape"}:
        raise ValueError(f"expected an array placeholder {{{ARRAY_KEY}, dtype, shape}}, got {obj!r:.80}")
    index, dtype, shape = obj[ARRAY_KEY], obj["dtype"], obj["shape"]
    buffers: Sequence[memoryview] = _state.buffers
    if not isinstance(index, int) or not 0 <= index < len(buffers):
        raise ValueError(f"array points at buffer {index!r}, but the message has {len(buffers)}")
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"array dtype {dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"array shape {shape!r} is not a list of non-negative ints")
    buffer = buffers[index]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if buffer.nbytes != expected_bytes:
        raise ValueError(
            f"buffer {index} holds {buffer.nbytes} bytes, but a {dtype} array of shape {shape} needs {expected_bytes}"
        )
    _state.used.add(index)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_envelope_decoder = msgspec.msgpack.Decoder(tuple[str, int, int])
_body_decoders = {
    name: msgspec.msgpack.Decoder(cls, dec_hook=_dec_hook) for name, cls in MESSAGE_TYPES.items()
}


def encode(message: Message) -> list[Frame]:
    """Frames for ``message``: envelope, body, then raw array buffers (not copied)."""
    name = type(message).__name__
    if name not in MESSAGE_TYPES:
        raise TypeError(f"{name} is not a bus message (see common.messages.ALL_MESSAGES)")
    _state.buffers = []
    try:
        body = _encoder.encode(message)
        buffers = _state.buffers
    finally:
        _state.buffers = []
    envelope = _encoder.encode((name, message.VERSION, len(buffers)))
    return [envelope, body, *buffers]


def peek_type(frames: Sequence[Any]) -> str:
    """The message type name from the envelope, without decoding the body."""
    name, _, _ = _decode_envelope(frames)
    return name


def decode(
    frames: Sequence[Any],
    expected: type[Message] | tuple[type[Message], ...] | None = None,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
) -> Message:
    """Decode frames (bytes, memoryviews or ``zmq.Frame``) into a message.

    ``expected`` restricts which message types this receiver accepts.
    Raises :class:`DecodeError` naming the problem for anything malformed.
    """
    if len(frames) > max_frames:
        raise DecodeError(f"message has {len(frames)} frames, more than the limit of {max_frames}")
    name, version, num_buffers = _decode_envelope(frames)
    cls = MESSAGE_TYPES[name]
    if expected is not None and not issubclass(cls, expected):
        allowed = expected if isinstance(expected, tuple) else (expected,)
        raise DecodeError(f"unexpected message {name} here; expected {', '.join(c.__name__ for c in allowed)}")
    if version != cls.VERSION:
        raise DecodeError(f"{name}: schema version {version} not supported (this build reads version {cls.VERSION})")
    if len(frames) != 2 + num_buffers:
        raise DecodeError(f"{name}: envelope promises {num_buffers} buffers but {len(frames) - 2} arrived")
    body = _as_view(frames[1])
    if body.nbytes > max_body_bytes:
        raise DecodeError(f"{name}: body of {body.nbytes} bytes exceeds the limit of {max_body_bytes}")
    buffers = [_as_view(f) for f in frames[2:]]
    for i, buffer in enumerate(buffers):
        if buffer.nbytes > max_buffer_bytes:
            raise DecodeError(f"{name}: buffer {i} of {buffer.nbytes} bytes exceeds the limit of {max_buffer_bytes}")
    return _decode_body(name, body, buffers)


def _decode_envelope(frames: Sequence[Any]) -> tuple[str, int, int]:
    if len(frames) < 2:
        raise DecodeError(f"message has {len(frames)} frame(s); at least envelope and body are needed")
    try:
        name, version, num_buffers = _envelope_decoder.decode(_as_view(frames[0]))
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise DecodeError(f"frame 0 is not an rlbus envelope [type, version, buffers]: {exc}") from None
    if name not in MESSAGE_TYPES:
        raise DecodeError(f"unknown message type {name!r:.60}")
    if num_buffers < 0:
        raise DecodeError(f"{name}: negative buffer count {num_buffers} in envelope")
    return name, version, num_buffers


def _decode_body(name: str, body: memoryview, buffers: list[memoryview]) -> Message:
    _state.buffers, _state.used = buffers, set()
    try:
        message = _body_decoders[name].decode(body)
        unused = set(range(len(buffers))) - _state.used
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise DecodeError(f"{name}: invalid body: {exc}") from None
    finally:
        _state.buffers, _state.used = [], set()
    if unused:
        raise DecodeError(f"{name}: buffers {sorted(unused)} are not referenced by the body")
    return message


def _as_view(frame: Any) -> memoryview:
    # zmq.Frame exposes .buffer; bytes and memoryviews are used as they are.
    buffer = getattr(frame, "buffer", frame)
    try:
        return memoryview(buffer).cast("B")
    except TypeError:
        raise DecodeError(f"frame of type {type(frame).__name__} is not a byte buffer") from None
