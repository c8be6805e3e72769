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
message names the message type (when known), the frame and what was wrong,
and whose ``reason`` is a one-word label for counting. Sizes and counts are
checked against the limits before the body is parsed or an array is made.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from rlbus.messages import ALL_MESSAGES, Message

ARRAY_KEY = "__ndarray__"
ALLOWED_DTYPES = frozenset("bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64".split())
DEFAULT_MAX_FRAMES = 4096
DEFAULT_MAX_HEADER_BYTES = 64 * 2**20
DEFAULT_MAX_FRAME_BYTES = 2 * 2**30
DEFAULT_MAX_PAYLOAD_BYTES = 4 * 2**30
MAX_ARRAY_DIMS = 32  # numpy's own limit is 64; no message has more than 3

MESSAGE_TYPES: dict[str, type[Message]] = {cls.__name__: cls for cls in ALL_MESSAGES}

Frame = bytes | memoryview


class DecodeError(ValueError):
    """Incoming frames do not form a valid message; the text says what was wrong.

    ``reason`` names the kind of problem in one word (``too_many_frames``,
    ``header_too_large``, ``payload_too_large``, ``bad_array`` ...): receivers
    count rejections per reason.
    """

    def __init__(self, text: str, reason: str = "malformed") -> None:
        super().__init__(text)
        self.reason = reason
        self.message_type: str | None = None
        """The type named by the envelope, when it named a known one."""
        self.ref: str | None = None
        """The message's ``REF_FIELD`` (e.g. a result's task id), when the body still yields it:
        lets the receiver answer the sender about exactly this message."""


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
    # Any failure here ends the decode as a bad_array DecodeError (msgspec wraps the ValueError).
    _state.array_error = True
    if not isinstance(obj, dict) or set(obj) != {ARRAY_KEY, "dtype", "shape"}:
        raise ValueError(f"expected an array placeholder {{{ARRAY_KEY}, dtype, shape}}, got {obj!r:.80}")
    index, dtype, shape = obj[ARRAY_KEY], obj["dtype"], obj["shape"]
    buffers: Sequence[memoryview] = _state.buffers
    if not isinstance(index, int) or not 0 <= index < len(buffers):
        raise ValueError(f"array points at buffer {index!r}, but the message has {len(buffers)}")
    if index in _state.used:
        raise ValueError(f"buffer {index} is referenced by two arrays")
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"array dtype {dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"array shape {shape!r:.80} is not a list of non-negative ints")
    if len(shape) > MAX_ARRAY_DIMS:
        raise ValueError(f"array has {len(shape)} dimensions, more than {MAX_ARRAY_DIMS}")
    buffer = buffers[index]
    # Python ints: a huge declared shape must not wrap around to the buffer's size.
    expected_bytes = math.prod(shape) * np.dtype(dtype).itemsize
    if buffer.nbytes != expected_bytes:
        raise ValueError(
            f"buffer {index} holds {buffer.nbytes} bytes, but a {dtype} array of shape {shape} needs {expected_bytes}"
        )
    _state.used.add(index)
    _state.array_error = False
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_envelope_decoder = msgspec.msgpack.Decoder(tuple[str, int, int])
_body_decoders = {name: msgspec.msgpack.Decoder(cls, dec_hook=_dec_hook) for name, cls in MESSAGE_TYPES.items()}
MAX_REF_CHARS = 256
MAX_ENVELOPE_BYTES = 256  # [type name, version, buffers]; the longest type name is ~20 characters
# Only the reference field, every other field skipped: a body that fails in full may still say
# which message it was. Field renames map the wire name onto ``ref``.
_ref_decoders = {
    name: msgspec.msgpack.Decoder(msgspec.defstruct(f"{name}Ref", [("ref", str)], rename={"ref": cls.REF_FIELD}))
    for name, cls in MESSAGE_TYPES.items()
    if cls.REF_FIELD is not None
}


def encode(message: Message) -> list[Frame]:
    """Frames for ``message``: envelope, body, then raw array buffers (not copied)."""
    name = type(message).__name__
    if name not in MESSAGE_TYPES:
        raise TypeError(f"{name} is not a bus message (see rlbus.messages.ALL_MESSAGES)")
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
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Message:
    """Decode frames (bytes, memoryviews or ``zmq.Frame``) into a message.

    ``expected`` restricts which message types this receiver accepts. Limits:
    ``max_frames`` frames, ``max_header_bytes`` for envelope plus body,
    ``max_frame_bytes`` per array buffer and ``max_payload_bytes`` for all of
    them; all are checked before the body is parsed. Raises
    :class:`DecodeError` naming the problem for anything malformed.
    """
    views = [_as_view(f) for f in frames]
    header_bytes = sum(v.nbytes for v in views[:2])
    if len(views) > max_frames:
        raise _named(DecodeError(f"message has {len(views)} frames, more than the limit of {max_frames}",
                                 "too_many_frames"), views)  # fmt: skip
    if header_bytes > max_header_bytes:
        raise _named(DecodeError(f"envelope and body of {header_bytes} bytes exceed the limit of {max_header_bytes}",
                                 "header_too_large"), views)  # fmt: skip
    name, version, num_buffers = _decode_envelope(views)
    try:
        return _decode_known(name, version, num_buffers, views, expected, max_frame_bytes, max_payload_bytes)
    except DecodeError as exc:
        exc.message_type, exc.ref = name, _peek_ref(name, views[1])
        raise


def _decode_known(name: str, version: int, num_buffers: int, views: list[memoryview],
                  expected: type[Message] | tuple[type[Message], ...] | None, max_frame_bytes: int,
                  max_payload_bytes: int) -> Message:  # fmt: skip
    cls = MESSAGE_TYPES[name]
    if expected is not None and not issubclass(cls, expected):
        allowed = expected if isinstance(expected, tuple) else (expected,)
        raise DecodeError(f"unexpected message {name} here; expected {', '.join(c.__name__ for c in allowed)}",
                          "unexpected_type")  # fmt: skip
    if version != cls.VERSION:
        raise DecodeError(f"{name}: schema version {version} not supported (this build reads version {cls.VERSION})",
                          "unsupported_version")  # fmt: skip
    if len(views) != 2 + num_buffers:
        raise DecodeError(f"{name}: envelope promises {num_buffers} buffers but {len(views) - 2} arrived",
                          "buffer_count")  # fmt: skip
    buffers = views[2:]
    _check_payload(name, buffers, max_frame_bytes, max_payload_bytes)
    return _decode_body(name, views[1], buffers)


def _named(error: DecodeError, views: list[memoryview]) -> DecodeError:
    """``error`` with the type and reference of a message refused for its size, when a short
    envelope names them: a result over the limits is then answered, not resent forever. The
    body is only skimmed for its reference field (nothing else of it is built)."""
    if len(views) >= 2 and views[0].nbytes <= MAX_ENVELOPE_BYTES:
        try:
            name, _, _ = _decode_envelope(views)
        except DecodeError:
            return error
        error.message_type, error.ref = name, _peek_ref(name, views[1])
    return error


def _peek_ref(name: str, body: memoryview) -> str | None:
    """The body's ``REF_FIELD`` if it is a short string, ignoring everything else in the body."""
    decoder = _ref_decoders.get(name)
    if decoder is None:
        return None
    try:
        ref = decoder.decode(body).ref
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return None
    return ref if 0 < len(ref) <= MAX_REF_CHARS else None


def _check_payload(name: str, buffers: list[memoryview], max_frame_bytes: int, max_payload_bytes: int) -> None:
    for i, buffer in enumerate(buffers):
        if buffer.nbytes > max_frame_bytes:
            raise DecodeError(f"{name}: buffer {i} of {buffer.nbytes} bytes exceeds the limit of {max_frame_bytes}",
                              "payload_too_large")  # fmt: skip
    payload_bytes = sum(b.nbytes for b in buffers)
    if payload_bytes > max_payload_bytes:
        raise DecodeError(f"{name}: {len(buffers)} buffers of {payload_bytes} bytes in all exceed the limit of "
                          f"{max_payload_bytes}", "payload_too_large")  # fmt: skip


def _decode_envelope(frames: Sequence[Any]) -> tuple[str, int, int]:
    if len(frames) < 2:
        raise DecodeError(f"message has {len(frames)} frame(s); at least envelope and body are needed",
                          "too_few_frames")  # fmt: skip
    try:
        name, version, num_buffers = _envelope_decoder.decode(_as_view(frames[0]))
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise DecodeError(f"frame 0 is not an rlbus envelope [type, version, buffers]: {exc}", "bad_envelope") from None
    if name not in MESSAGE_TYPES:
        raise DecodeError(f"unknown message type {name!r:.60}", "unknown_type")
    if num_buffers < 0:
        raise DecodeError(f"{name}: negative buffer count {num_buffers} in envelope", "bad_envelope")
    return name, version, num_buffers


def _decode_body(name: str, body: memoryview, buffers: list[memoryview]) -> Message:
    _state.buffers, _state.used, _state.array_error = buffers, set(), False
    try:
        message = _body_decoders[name].decode(body)
        unused = set(range(len(buffers))) - _state.used
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        reason = "bad_array" if _state.array_error else "bad_body"
        raise DecodeError(f"{name}: invalid body: {exc}", reason) from None
    finally:
        _state.buffers, _state.used, _state.array_error = [], set(), False
    if unused:
        raise DecodeError(f"{name}: buffers {sorted(unused)} are not referenced by the body", "unreferenced_buffers")
    return message


def _as_view(frame: Any) -> memoryview:
    # zmq.Frame exposes .buffer; bytes and memoryviews are used as they are.
    buffer = getattr(frame, "buffer", frame)
    try:
        return memoryview(buffer).cast("B")
    except TypeError:
        raise DecodeError(f"frame of type {type(frame).__name__} is not a byte buffer", "not_bytes") from None
