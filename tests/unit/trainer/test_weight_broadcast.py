"""The trainer side of the collective transport without replicas: which steps are announced with a
group, and the config's checks."""

import numpy as np
import pytest
from pydantic import ValidationError

from rlbus.messages import LoraAdapterMeta
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.weight_broadcast import publish_step

ARRAYS = [("w", np.arange(6, dtype=np.float32), "float32")]


class FakeServer:
    def __init__(self):
        from rlbus.weights import WeightStore

        self.store = WeightStore(bucket_bytes=1 << 20)

    def publish(self, step, tensors, lora=None, broadcast_group=""):
        return self.store.add(step, tensors, lora, broadcast_group)


class FakeBroadcaster:
    def __init__(self, group: str, accept: bool = True):
        self.group, self.accept, self.submitted = group, accept, []

    def ready_group(self) -> str:
        return self.group

    def submit(self, announced, arrays) -> bool:
        self.submitted.append((announced.step, sorted(arrays)))
        return self.accept


def test_a_ready_group_is_announced_and_given_the_step():
    broadcaster = FakeBroadcaster("e.0")
    announced = publish_step(FakeServer(), broadcaster, 4, ARRAYS)
    assert announced.broadcast_group == "e.0" and broadcaster.submitted == [(4, ["w"])]


def test_no_group_no_broadcaster_or_an_adapter_step_travel_by_bus_only():
    lora = LoraAdapterMeta(name="a", rank=8, alpha=16, target_modules=["q_proj"])
    for broadcaster, adapter in [(FakeBroadcaster(""), None), (None, None), (FakeBroadcaster("e.0"), lora)]:
        announced = publish_step(FakeServer(), broadcaster, 1, ARRAYS, adapter)
        assert announced.broadcast_group == ""
        assert broadcaster is None or broadcaster.submitted == []


@pytest.mark.parametrize(("fields", "named"), [
    ({}, "needs weight_group_address"),
    ({"weight_group_address": "10.0.0.1:99999"}, "port 99999"),
    ({"weight_group_address": "10.0.0.1:29650", "max_concurrent_runs": 2}, "max_concurrent_runs"),
])  # fmt: skip
def test_collective_config_names_what_is_wrong(fields, named):
    with pytest.raises(ValidationError, match=named):
        TrainerConfig(model="m", weight_transport="collective", **fields)


def test_the_bus_stays_the_default():
    assert TrainerConfig(model="m").weight_transport == "bus"
