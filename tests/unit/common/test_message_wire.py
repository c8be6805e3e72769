"""The wire format of every bus message is pinned: one instance of each, built the same way from its
type hints every time, must encode to the same bytes.

The digests below were recorded from the encoder; a change that moves messages between modules
must leave them alone. A deliberate change of a message (and its ``VERSION`` bump) changes its
digest: record the new one with ``python tests/unit/common/test_message_wire.py``.
"""

from __future__ import annotations

import hashlib
import sys
import types
import typing
from typing import Any, Literal

import msgspec
import numpy as np
import pytest

from rlbus import messages
from rlbus.codec import encode
from rlbus.messages import ALL_MESSAGES, Message

WIRE_DIGESTS = {
    "Hello": "cbb6a66c3820ce16c867b85acc1feb26a49a8bee982cf4114206ac873691d7c4",
    "Ack": "4bf9da0dcc37de78b256b2479f4fd214a05859474278ab15ba9f8d0e6af17255",
    "Refused": "63b71a6c22f43db0b594494035826b8ad7c38c75d42ecbe81e75f45c35e0617d",
    "Heartbeat": "cc8b8a93594d4128e1f2d69ee76fdb2aa526c1762b0d020fec0115f7eb4b0585",
    "MetricsReport": "b6282f11f0d187765601fac5b554cf8a9741686e87c47b088d89004fb7bb8da9",
    "Event": "3286b146808009ce744d3008864ed59cf729bda00d0d87ad24065bc4da3cc966",
    "RolloutSamples": "1753192a1f2b15b3fbeef8af0e18fb8fcc84973e138e65b234b5a6235fc78450",
    "TaskRequest": "ee483adb9a55c2af67d2cb7e2c599a1e8636070c558ed9c03e0d8f6757dbc069",
    "RolloutTask": "ef3131f399c3196e0ecd30e910d34d6582e626a34a015e216e7d3bed10f5b1a7",
    "RolloutResult": "15944455de9d309aa45f574bc30a10be7e0183b64b8355ff90ecf27feb3c0d00",
    "ResultAck": "a09c6ffa53c0cc5bfaead1a503fb6b3f6e81dd3815c9bcf12d10b3845889d3d1",
    "BatchRequest": "361c8343f2fd5e30299fb5cd25d8b3cb75d0cae29c2714df88efdb57e170d79d",
    "TrainBatch": "9a28aa0a642933059dc76c0a9cb5dc43a8d2eeb3e42695a26d404b4a9673f31c",
    "BatchAck": "2c63b18227416a842326463502ec798be1da77aef1ba05ae902165530df22e3d",
    "WeightsAnnounced": "4f5b8838d49c76a4a843bfb22ca0a628e5f53abdf8293b73831495d21399d277",
    "WeightsQuery": "f68a829795a38e194ef940c9d6eb95983c122d2aa2399eb0c96d9680844600b3",
    "WeightsFetch": "f2a52d98cc6d026866e7e089c2913ef518d622ee0dc2a81c798502ead86a9714",
    "WeightsBucket": "b1c119bad85c8e29fe83ff051373f3cb0df095bda9d36aee7f697e5fe2ec36a5",
    "PolicyLoaded": "a5437feceba8bd265fe2edff200c440e62fcedff8521fe2671bb0532c87735f1",
    "ViewRequest": "f61f21b927ab69d468e9da865e67801f73202116b3c6b6b5a892a695d73103bb",
    "ViewSnapshot": "1b513a859b973fca6ea46e4b58255781f86c4f3e965a9937b10ce9bef36fd7d6",
    "RunJoin": "49f4697f38b8fc792a5c9d60f768cb956aec5a07bd0df58752228aab20ebc10e",
    "RunJoined": "dedd828f0988fe1045515e34205922000772726efb09cdbe0c576820912a30f5",
    "RunLeave": "3d08a4bd23ed85f0e87cda6448ab32ef37c7aec740bb2d7ae00690bddc71da80",
}


def value_for(annotation: Any, name: str) -> Any:
    """A value of ``annotation`` that depends only on the type and the field ``name``; never a
    default, so every field's encoding counts."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is np.ndarray:
        return np.arange(len(name), dtype=np.int32)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return instance_of(annotation)
    if annotation is Any:
        return {f"{name}-any": [len(name), f"{name}-text"]}
    if origin is Literal:
        return args[-1]
    if origin in (typing.Union, types.UnionType):
        return value_for(next(a for a in args if a is not type(None)), name)
    if origin is list:
        return [value_for(args[0], name)]
    if origin is dict:
        return {f"{name}-key": value_for(args[1], name)}
    simple = {str: f"{name}-text", bool: True, int: len(name), float: len(name) + 0.5}
    return simple[annotation]


def instance_of(cls: type[msgspec.Struct]) -> msgspec.Struct:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: value_for(hints[f.name], f.name) for f in msgspec.structs.fields(cls)})


def wire_digest(cls: type[Message]) -> str:
    frames = encode(instance_of(cls))
    return hashlib.sha256(b"|".join(bytes(frame) for frame in frames)).hexdigest()


def test_every_message_has_a_recorded_digest():
    assert sorted(WIRE_DIGESTS) == sorted(cls.__name__ for cls in ALL_MESSAGES)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda cls: cls.__name__)
def test_wire_format_is_unchanged(cls):
    assert wire_digest(cls) == WIRE_DIGESTS.get(cls.__name__), f"{cls.__name__}'s encoding changed"


def test_each_message_is_exported_by_rlbus_messages_under_its_own_name():
    # The codec finds a type by its class name: every name must lead back to the same class.
    assert all(getattr(messages, cls.__name__) is cls for cls in ALL_MESSAGES)


if __name__ == "__main__":
    sys.stdout.writelines(f'    "{cls.__name__}": "{wire_digest(cls)}",\n' for cls in ALL_MESSAGES)
