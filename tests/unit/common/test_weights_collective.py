"""The torch-free half of the collective weight transport: addresses, the flat bucket layout both
sides derive from a manifest, and the broadcast header a receiver decodes from the store."""

import numpy as np
import pytest

from rlbus.weight_codec import checksum
from rlbus.weights import WeightStore
from rlbus.weights_collective import ALIGN, BroadcastHeader, bucket_layout, parse_address


@pytest.mark.parametrize(("address", "parsed"), [("127.0.0.1:29650", ("127.0.0.1", 29650)),
                                                 ("trainer-0.local:1", ("trainer-0.local", 1)),
                                                 ("[::1]:65535", ("::1", 65535))])  # fmt: skip
def test_addresses_parse(address, parsed):
    assert parse_address(address) == parsed


@pytest.mark.parametrize(("address", "named"), [("127.0.0.1", "is not host:port"), ("host:0", "port 0"),
                                                ("host:70000", "port 70000"), ("tcp://h:1", "is not host:port")])  # fmt: skip
def test_bad_addresses_are_named(address, named):
    with pytest.raises(ValueError, match=named):
        parse_address(address)


def test_layout_places_every_tensor_aligned_in_its_bucket_without_overlap():
    arrays = [("a", np.arange(3, dtype=np.float32), "float32"), ("b", np.arange(5, dtype=np.uint16), "bfloat16"),
              ("c", np.arange(300, dtype=np.float32), "float32"), ("d", np.arange(1, dtype=np.int64), "int64")]  # fmt: skip
    announced = WeightStore(bucket_bytes=100).add(1, arrays)
    sizes, slots = bucket_layout(announced.manifest, announced.num_buckets)
    assert [slot.meta.name for slot in slots] == ["a", "b", "c", "d"]
    assert announced.num_buckets == 3 and len(sizes) == 3
    flat = [np.zeros(size, np.uint8) for size in sizes]
    for slot, (_, array, _) in zip(slots, arrays, strict=True):
        assert slot.offset % ALIGN == 0
        region = flat[slot.meta.bucket][slot.offset : slot.offset + slot.meta.nbytes]
        assert not region.any(), f"{slot.meta.name} overlaps another tensor"
        region[:] = array.view(np.uint8)
    for slot in slots:  # what a receiver checks: each tensor's bytes against the manifest
        region = flat[slot.meta.bucket][slot.offset : slot.offset + slot.meta.nbytes]
        assert checksum(region) == slot.meta.checksum


def test_layout_refuses_a_bucket_outside_the_step():
    announced = WeightStore(bucket_bytes=100).add(1, [("a", np.zeros(4, np.float32), "float32")])
    with pytest.raises(ValueError, match="bucket 0; the step has 0"):
        bucket_layout(announced.manifest, 0)


def test_header_round_trips_and_refuses_what_is_not_one():
    header = BroadcastHeader(step=7, bucket_sizes=[128, 64])
    assert BroadcastHeader.decode(header.encode()) == header
    for raw, named in [(b"nope", "not JSON"), (b'{"step": 1}', "not JSON"), (b'{"step": "1", "bucket_sizes": [1]}', "step"),
                       (b'{"step": 1, "bucket_sizes": [-1]}', "not byte counts"), (b" " * (2 << 20), "bytes")]:  # fmt: skip
        with pytest.raises(ValueError, match=named):
            BroadcastHeader.decode(raw)
