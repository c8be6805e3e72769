"""The replica side of the collective transport without processes: received buffers are checked
against the manifest before anything loads, steps not broadcast to this replica go over the bus,
and the config names what is wrong."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.weight_collective import (
    GroupSettings,
    Received,
    WeightReceiver,
    receive_broadcast,
    received_tensors,
)
from rlbus.weight_codec import WeightsCorrupt
from rlbus.weights import WeightStore
from rlbus.weights_collective import bucket_layout

ARRAYS = [("w", np.arange(12, dtype=np.float32).reshape(3, 4), "float32"),
          ("n", np.arange(5, dtype=np.uint16), "bfloat16")]  # fmt: skip


def broadcast_of(announced) -> Received:
    """The buffers a receiver would hold after an exact broadcast of ``announced``."""
    sizes, slots = bucket_layout(announced.manifest, announced.num_buckets)
    buffers = [torch.zeros(size, dtype=torch.uint8) for size in sizes]
    by_name = {name: array for name, array, _ in ARRAYS}
    for slot in slots:
        raw = torch.from_numpy(by_name[slot.meta.name].reshape(-1).view(np.uint8).copy())
        buffers[slot.meta.bucket][slot.offset : slot.offset + slot.meta.nbytes] = raw
    return Received(announced.broadcast_group, announced.step, 0, buffers)


def test_exact_buffers_give_the_tensors_as_views():
    announced = WeightStore(bucket_bytes=16).add(3, ARRAYS, broadcast_group="e.0")
    tensors = dict(received_tensors(broadcast_of(announced), announced, verify=True))
    np.testing.assert_array_equal(tensors["w"].numpy(), ARRAYS[0][1])
    assert tensors["n"].dtype == torch.bfloat16
    np.testing.assert_array_equal(tensors["n"].view(torch.uint16).numpy(), ARRAYS[1][1])


def test_a_changed_byte_is_refused_unless_verification_is_off():
    announced = WeightStore(bucket_bytes=16).add(3, ARRAYS, broadcast_group="e.0")
    received = broadcast_of(announced)
    received.buffers[0][0] ^= 1
    with pytest.raises(WeightsCorrupt, match="checksum mismatch on broadcast tensor w"):
        received_tensors(received, announced, verify=True)
    assert len(received_tensors(received, announced, verify=False)) == 2  # sizes still checked, bytes trusted


def test_buffers_of_another_layout_are_refused():
    announced = WeightStore(bucket_bytes=16).add(3, ARRAYS, broadcast_group="e.0")
    received = broadcast_of(announced)
    received.buffers.append(torch.zeros(64, dtype=torch.uint8))
    with pytest.raises(WeightsCorrupt, match="the manifest lays out"):
        received_tensors(received, announced, verify=True)


def test_steps_not_broadcast_to_this_replica_go_over_the_bus():
    receiver = WeightReceiver(GroupSettings(address="127.0.0.1:1", rank=1, size=2))  # never started: in no group
    store = WeightStore(bucket_bytes=16)
    assert receive_broadcast(store.add(1, ARRAYS), receiver) is None  # announced without a group
    assert receive_broadcast(store.add(2, ARRAYS, broadcast_group="e.0"), receiver) is None  # not a member
    assert receive_broadcast(store.add(3, ARRAYS, broadcast_group="e.0"), None) is None  # transport is the bus


@pytest.mark.parametrize(("fields", "named"), [
    ({}, "needs weight_group_address"),
    ({"weight_group_address": "trainer"}, "is not host:port"),
    ({"weight_group_address": "trainer:29650", "weight_group_rank": 3, "weight_group_replicas": 2}, "is past"),
    ({"weight_group_address": "trainer:29650", "tensor_parallel_size": 2}, "tensor_parallel_size = 1"),
])  # fmt: skip
def test_collective_config_names_what_is_wrong(fields, named):
    with pytest.raises(ValidationError, match=named):
        InferenceConfig(model="m", weight_transport="collective", **fields)


def test_collective_settings_reach_the_worker_only_when_asked_for():
    assert InferenceConfig(model="m").weight_group_settings() is None
    config = InferenceConfig(model="m", weight_transport="collective", weight_group_address="t:29650",
                             weight_group_replicas=4, weight_group_rank=4, weight_group_backend="gloo")  # fmt: skip
    assert GroupSettings(**config.weight_group_settings()) == GroupSettings("t:29650", 4, 5, "gloo", 60.0, True)
