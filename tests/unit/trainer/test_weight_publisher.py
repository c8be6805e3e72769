"""What an inference replica fetches from the trainer equals the trainer's parameters."""

import numpy as np
import torch
import zmq

from rlbus.bus import Bus
from rlbus.config.base import BusConfig, BusEndpoints
from rlbus.messages import WeightsAnnounced
from rlbus.pubsub import Subscriber
from rlbus.services.trainer.config import TrainerConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.model import copy_to_host, load_model, to_numpy
from rlbus.services.trainer.service import WeightPublisher
from rlbus.weights import PublishBuffers, ReplicaTransfer, fetch_step, fetch_weights, query_latest

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_subscriber_receives_exactly_the_trainers_parameters(tiny_model_dir):
    endpoints = BusEndpoints(trainer_weights="tcp://127.0.0.1:*", trainer_announce="tcp://127.0.0.1:*")
    config = TrainerConfig(model=str(tiny_model_dir), weight_bucket_mb=1, bus=BusConfig(endpoints=endpoints))
    model = load_model(str(tiny_model_dir), "float32", CTX.device)
    with Bus(BusConfig(linger_ms=0, request_timeout_s=10)) as bus:
        publisher = WeightPublisher(bus, config, CTX)
        try:
            subscriber = Subscriber(bus, publisher.server.announce_address)
            subscriber.wait_ready(timeout_s=10)
            publisher.publish(1, model)
            with torch.no_grad():  # the next step changes the weights; step 1 must stay as it was
                next(model.parameters()).add_(1.0)
            publisher.publish(2, model)
            announced = subscriber.recv(timeout_s=10, expected=WeightsAnnounced)
            assert announced.step == 1
            sock = bus.connect(zmq.DEALER, publisher.server.fetch_address, "weights-client")
            latest = query_latest(bus, sock, "replica-0", timeout_s=10)
            assert latest.step == 2 and latest.num_buckets > 1  # 1 MiB buckets: streamed in parts
            received = {name: (array, dtype) for name, array, dtype in fetch_step(bus, sock, latest, "replica-0", 10)}
        finally:
            publisher.stop()
    params = dict(model.named_parameters())
    assert list(received) == list(params)  # HF names, tied lm_head once
    assert "lm_head.weight" not in received and "model.embed_tokens.weight" in received
    for name, (array, dtype) in received.items():
        assert dtype == "float32"
        np.testing.assert_array_equal(array, params[name].detach().numpy())


def test_bfloat16_travels_as_uint16_bits():
    tensor = torch.tensor([1.5, -2.25, 3.0e-3], dtype=torch.bfloat16)
    array, dtype = to_numpy(tensor)
    assert dtype == "bfloat16" and array.dtype == np.uint16
    assert torch.equal(torch.from_numpy(array.view(np.int16)).view(torch.bfloat16), tensor)


def test_host_buffers_are_reused_in_turn_and_copies_are_exact():
    buffers = PublishBuffers(num_sets=2)
    weights = {"w": torch.randn(4, 3), "b": torch.randn(5, dtype=torch.bfloat16)}
    copies = []
    for _ in range(3):
        buffers.begin_step()
        copies.append({name: copy_to_host(tensor, buffers, name) for name, tensor in weights.items()})
        weights = {name: tensor * 2 for name, tensor in weights.items()}
    (w1, _), (w2, _), (w3, _) = (step["w"] for step in copies)
    assert np.shares_memory(w1, w3) and not np.shares_memory(w1, w2)  # set 1, set 2, set 1 again
    np.testing.assert_array_equal(w2, weights["w"].numpy() / 4)  # step 2 untouched by step 3
    bits, dtype = copies[2]["b"]
    assert dtype == "bfloat16" and bits.dtype == np.uint16
    assert torch.equal(torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16), weights["b"] / 2)


def test_weight_delta_sends_a_replica_holding_the_last_step_only_what_changed(tiny_model_dir):
    endpoints = BusEndpoints(trainer_weights="tcp://127.0.0.1:*", trainer_announce="tcp://127.0.0.1:*")
    config = TrainerConfig(model=str(tiny_model_dir), weight_delta=True, bus=BusConfig(endpoints=endpoints))
    model = load_model(str(tiny_model_dir), "float32", CTX.device)
    with Bus(BusConfig(linger_ms=0, request_timeout_s=10)) as bus:
        publisher = WeightPublisher(bus, config, CTX)
        try:
            sock = bus.connect(zmq.DEALER, publisher.server.fetch_address, "weights-client")
            publisher.publish(1, model)
            transfer = ReplicaTransfer()
            first = query_latest(bus, sock, "replica-0", timeout_s=10)
            transfer.loaded(fetch_weights(bus, sock, first, "replica-0", 10, base=transfer.base(first),
                                          staging=transfer.staging()))  # fmt: skip
            with torch.no_grad():  # one small step: every weight moves a little
                for param in model.parameters():
                    param.mul_(1 + 1e-3 * torch.randn_like(param))
            publisher.publish(2, model)
            second = query_latest(bus, sock, "replica-0", timeout_s=10)
            fetched = fetch_weights(bus, sock, second, "replica-0", 10, base=transfer.base(second),
                                    staging=transfer.staging())  # fmt: skip
        finally:
            publisher.stop()
    assert second.delta and fetched.num_delta_tensors > 0 and fetched.wire_bytes < second.total_bytes
    params = dict(model.named_parameters())
    for name, array, _ in fetched.tensors:
        np.testing.assert_array_equal(array, params[name].detach().numpy())
