"""Hostile frames for the bound sockets of the real services, and a fuzzer that sends them.

:func:`malformed_frames` draws multipart messages a receiver expecting
``expected`` must reject: random bytes, truncated msgpack, messages of other
types or versions, bodies with wrong or missing fields, array placeholders
with wrong buffers or absurd shapes, too many frames. :class:`SocketFuzzer`
sends each one to a real bound socket from a plain zmq socket and keeps count,
using the codec itself as the oracle of what must be rejected. Examples that
would decode are skipped (``assume``): a well-formed message with hostile
values is an authorization question (CurveZMQ), not a parsing one.

Runs are derandomized (the same examples on every run, for CI); set
``RLBUS_FUZZ_EXAMPLES`` to run more or fewer per socket.
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Callable

import msgpack
import zmq
from hypothesis import HealthCheck, assume, find, given, settings
from hypothesis import strategies as st

from rlbus.bus import subscription_reason
from rlbus.codec import ALLOWED_DTYPES, DecodeError, decode, encode
from rlbus.messages import ALL_MESSAGES, Message, WeightsBucket
from tests.unit.common.message_strategies import structs

NUM_EXAMPLES = int(os.environ.get("RLBUS_FUZZ_EXAMPLES", "2000"))
SEND_TIMEOUT_MS = 60_000  # a service that stops reading fails the test instead of hanging it
FUZZ_SETTINGS = settings(
    max_examples=NUM_EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)  # fmt: skip

Frames = list[bytes]
INT64 = st.integers(-(2**63), 2**64 - 1)
MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats() | st.text(max_size=16) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
SHAPES = st.lists(st.one_of(st.integers(0, 8), INT64, st.just(2**32)), max_size=40)


def envelope(name: str, version: int, num_buffers: int) -> bytes:
    return msgpack.packb([name, version, num_buffers])


def encoded(classes: list[type[Message]]) -> st.SearchStrategy[Frames]:
    """Valid frames of a message of one of ``classes``, with any field values."""
    return st.sampled_from(classes).flatmap(structs).map(lambda m: [bytes(f) for f in encode(m)])


@functools.cache
def simplest(cls: type[Message]) -> Frames:
    """Frames of the simplest valid ``cls`` message (drawing big nested ones each time is slow)."""
    message = find(structs(cls), lambda _: True, settings=settings(database=None))
    return [bytes(f) for f in encode(message)]


def simplest_of(classes: list[type[Message]]) -> st.SearchStrategy[Frames]:
    pool = [simplest(cls) for cls in classes]  # built now: find() may not run inside a @given
    return st.sampled_from(pool).map(list)


def _cut(frames: Frames, index: int, keep: int) -> Frames:
    index %= len(frames)
    frames[index] = frames[index][: keep % max(1, len(frames[index]))]
    return frames


def _with_version(frames: Frames, version: int) -> Frames:
    name, _, num_buffers = msgpack.unpackb(frames[0])
    return [envelope(name, version, num_buffers), *frames[1:]]


def _mangle_field(frames: Frames, key_choice: int, value: object, mode: int) -> Frames:
    """Replace, drop or add one field of the body (msgpack map)."""
    body = msgpack.unpackb(frames[1], strict_map_key=False)
    keys = sorted(body, key=str)
    if mode == 0 and keys:
        body[keys[key_choice % len(keys)]] = value
    elif mode == 1 and keys:
        del body[keys[key_choice % len(keys)]]
    else:
        body[f"extra_{key_choice}"] = value
    return [frames[0], msgpack.packb(body), *frames[2:]]


def _placeholder_frames(cls: type[Message], key_choice: int, dtype: str, shape: list, index: int,
                        buffers: list[bytes], promised: int) -> Frames:  # fmt: skip
    """A body whose field points at a buffer, with buffers that may not match it."""
    fields = cls.__struct_fields__
    body = {fields[key_choice % len(fields)]: {"__ndarray__": index, "dtype": dtype, "shape": shape}}
    return [envelope(cls.__name__, cls.VERSION, promised), msgpack.packb(body), *buffers]


def malformed_frames(expected: tuple[type[Message], ...], max_frames: int) -> st.SearchStrategy[Frames]:
    """Multipart messages a receiver of ``expected`` must reject (mostly; see ``assume`` in the fuzzer)."""
    others = [cls for cls in ALL_MESSAGES if cls not in expected]
    mine = list(expected)
    dtypes = st.sampled_from([*sorted(ALLOWED_DTYPES), "object", "complex64", "bfloat16", ""])
    buffers = st.lists(st.binary(max_size=64), max_size=4)
    return st.one_of(
        st.lists(st.binary(max_size=300), min_size=1, max_size=8),  # random bytes
        st.builds(_cut, simplest_of(mine + others), st.integers(0, 8), st.integers(0, 2**16)),  # truncated
        simplest_of(others),  # valid, but not a type this socket takes
        st.builds(_with_version, simplest_of(mine), INT64.filter(lambda v: v != 1)),  # unknown schema version
        st.builds(lambda cls, body: [envelope(cls.__name__, cls.VERSION, 0), body],
                  st.sampled_from(mine), st.binary(max_size=200) | MSGPACK_VALUES.map(msgpack.packb)),  # bad body
        st.builds(_mangle_field, encoded(mine), st.integers(0, 16), MSGPACK_VALUES, st.integers(0, 2)),
        st.builds(_placeholder_frames, st.sampled_from([*mine, WeightsBucket]), st.integers(0, 16), dtypes,
                  SHAPES, st.integers(-1, 4), buffers, st.integers(-2, 6)),  # header + wrong tensor frames
        st.builds(lambda frames, extra: frames + [b"x"] * extra, simplest_of(mine),
                  st.integers(max_frames, max_frames + 40)),  # too many frames
    )  # fmt: skip


def not_subscriptions() -> st.SearchStrategy[Frames]:
    """What an XSUB peer may send an XPUB that is not a (un)subscription: single frames not
    starting with byte 0 or 1 (libzmq itself treats those as subscription commands, and splits
    multipart user messages from an XSUB in ways of its own)."""
    return st.binary(max_size=300).filter(lambda f: f[:1] not in (b"\x00", b"\x01")).map(lambda f: [f])


class SocketFuzzer:
    """A plain zmq socket aimed at one bound socket; counts what it sent and what must be rejected."""

    def __init__(self, socket_type: int, address: str, must_reject: Callable[[Frames], bool]) -> None:
        self.sock = zmq.Context.instance().socket(socket_type)
        self.sock.linger = 0
        self.sock.sndtimeo = SEND_TIMEOUT_MS
        self.sock.connect(address)
        self.must_reject = must_reject
        self.num_sent = 0
        self.num_frames: Counter[int] = Counter()

    def send(self, frames: Frames) -> None:
        rejected = self.must_reject(frames)
        assume(rejected)
        self.sock.send_multipart(frames)
        self.num_sent += 1
        self.num_frames[min(len(frames), 10)] += 1

    def run(self, strategy: st.SearchStrategy[Frames]) -> int:
        """Send ``NUM_EXAMPLES`` drawn messages (hypothesis, derandomized); returns how many were sent."""

        @FUZZ_SETTINGS
        @given(strategy)
        def fuzz_once(frames: Frames) -> None:
            self.send(frames)

        fuzz_once()
        return self.num_sent

    def run_until_counted(self, strategy: st.SearchStrategy[Frames], counted: Callable[[], int], what: str) -> int:
        """Send the examples, then wait until the receiver has counted every one, with the socket
        still open: closing it starts the linger clock, and frames still queued when that runs out
        are dropped (a receiver slowed by a loaded machine then falls short)."""
        num_sent = self.run(strategy)
        wait_for_count(counted, num_sent, what)
        return num_sent

    def close(self) -> None:
        self.sock.close(linger=0)


def decode_oracle(expected: tuple[type[Message], ...], limits: dict[str, int]) -> Callable[[Frames], bool]:
    """True when the codec, with the receiving bus's limits, rejects the frames."""

    def must_reject(frames: Frames) -> bool:
        try:
            decode(frames, expected, **limits)
        except DecodeError:
            return True
        return False

    return must_reject


def subscription_oracle(frames: Frames) -> bool:
    return subscription_reason(frames) is not None


def wait_for_count(read: Callable[[], int], expected: int, what: str, stall_s: float = 120.0) -> None:
    """Poll ``read()`` until it reaches ``expected``; fails once the count has not moved for
    ``stall_s`` (a condition with a deadline, not a timed assertion)."""
    last, deadline = read(), time.monotonic() + stall_s
    while last < expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: counted {last} of {expected} rejections, none for {stall_s}s")
        time.sleep(0.01)  # polling a counter owned by another thread; no message to wait on
        if (count := read()) != last:
            last, deadline = count, time.monotonic() + stall_s
    assert read() == expected, f"{what}: counted {read()} rejections, expected {expected}"
