"""Weights keyed by adapter: runs sharing one trainer publish the same step numbers for their own
adapters, and each is stored, queried, fetched and waited for separately (real sockets)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from rlbus.bus import Bus
from rlbus.config import BusConfig
from rlbus.messages import LoraAdapterMeta, Refused, WeightsAnnounced, WeightsFetch, WeightsQuery
from rlbus.weights import (
    ReplicaTransfer,
    WeightServer,
    WeightStore,
    adapter_problem,
    fetch_step,
    fetch_weights,
    query_latest,
)

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def meta(name: str) -> LoraAdapterMeta:
    return LoraAdapterMeta(name=name, rank=2, alpha=4.0, target_modules=["q_proj"])


def adapter(seed: int) -> list[tuple[str, np.ndarray, str]]:
    """An adapter's tensors, different for every seed (A: 2 KiB, B: 2 KiB; two buckets of 2 KiB)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2, 256)).astype(np.float32)
    b = rng.standard_normal((256, 2)).astype(np.float32)
    return [(f"{PREFIX}.lora_A.weight", a, "float32"), (f"{PREFIX}.lora_B.weight", b, "float32")]


def assert_bit_exact(received, sent) -> None:
    assert [name for name, _, _ in received] == [name for name, _, _ in sent]
    for (_, got, _), (_, want, _) in zip(received, sent, strict=True):
        assert got.tobytes() == want.tobytes()


@pytest.fixture
def served():
    bus = Bus(BusConfig(request_timeout_s=5))
    server = WeightServer(bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", WeightStore(bucket_bytes=2048)).start()
    sock = bus.connect(zmq.DEALER, server.fetch_address, "weights-client")
    yield bus, server, sock
    server.stop()
    bus.close()


def test_the_store_keeps_each_adapters_steps_apart():
    store = WeightStore(bucket_bytes=2048, keep_steps=1)
    store.add(3, adapter(1), meta("a"))
    store.add(3, adapter(2), meta("b"))
    assert (store.latest("a").lora.name, store.latest("b").lora.name, store.latest()) == ("a", "b", None)
    store.add(4, adapter(3), meta("a"))  # keep_steps counts a's steps only: b's step 3 stays
    assert (store.latest("a").step, store.latest("b").step) == (4, 3)
    refused = store.bucket(3, 0, adapter="a")
    assert isinstance(refused, Refused) and "step 3 of adapter 'a' is not held (have [4])" in refused.reason
    assert store.bucket(3, 0, adapter="b").tensors[0].tobytes() == adapter(2)[0][1].tobytes()
    assert "step 3 is not held (have [])" in store.bucket(3, 0).reason  # the full weights: none published


def test_two_adapters_at_the_same_step_are_each_fetched_back_bit_exact(served):
    bus, server, sock = served
    sent = {"a": adapter(1), "b": adapter(2)}
    for name, tensors in sent.items():
        server.publish(3, tensors, meta(name))
    for name, tensors in sent.items():
        announced = query_latest(bus, sock, "replica-0", timeout_s=5, adapter=name)
        assert (announced.step, announced.lora.name, announced.num_buckets) == (3, name, 2)
        assert_bit_exact(fetch_step(bus, sock, announced, "replica-0", timeout_s=5), tensors)
    assert query_latest(bus, sock, "replica-0", timeout_s=5) is None  # no full weights were published
    assert query_latest(bus, sock, "replica-0", timeout_s=5, adapter="c") is None


def test_a_query_for_an_adapter_with_no_step_is_refused_by_name(served):
    bus, server, sock = served
    server.publish(1, adapter(1), meta("a"))
    reply = bus.request(sock, WeightsQuery(replica_id="r", adapter="run-b"), (WeightsAnnounced, Refused), 5)
    assert isinstance(reply, Refused) and reply.reason == "no step of adapter 'run-b' published yet"


@pytest.mark.parametrize("hostile", ["../etc", "a/b", ".hidden", "x" * 10_000, "run\n", "\x00"])
def test_hostile_adapter_names_are_refused_and_the_server_serves_on(served, hostile):
    bus, server, sock = served
    sent = adapter(1)
    server.publish(2, sent, meta("a"))
    for request in (WeightsQuery(replica_id="r", adapter=hostile),
                    WeightsFetch(replica_id="r", step=2, bucket=0, adapter=hostile)):  # fmt: skip
        reply = bus.request(sock, request, (WeightsAnnounced, Refused), 5)
        assert isinstance(reply, Refused) and reply.request == type(request).__name__
        assert "is not an adapter name" in reply.reason and len(reply.reason) < 400
    announced = query_latest(bus, sock, "r", timeout_s=5, adapter="a")
    assert_bit_exact(fetch_step(bus, sock, announced, "r", timeout_s=5), sent)


def test_a_client_is_stopped_before_it_sends_a_name_that_cannot_be_an_adapter(served):
    bus, _, sock = served
    with pytest.raises(ValueError, match=r"adapter '\.\./x' is not an adapter name"):
        query_latest(bus, sock, "r", timeout_s=5, adapter="../x")
    assert adapter_problem("") == adapter_problem("run-a.v2_1") == ""


def test_deltas_apply_to_the_same_adapters_base_step():
    bus = Bus(BusConfig(request_timeout_s=5))
    store = WeightStore(bucket_bytes=2048, delta=True)
    server = WeightServer(bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", store).start()
    try:
        sock = bus.connect(zmq.DEALER, server.fetch_address, "weights-client")
        transfers = {"a": ReplicaTransfer(), "b": ReplicaTransfer()}
        for step, seeds in ((3, {"a": 1, "b": 2}), (4, {"a": 1, "b": 2})):
            published = {}
            for name, seed in seeds.items():
                tensors = [(n, array + step * 1e-3, d) for n, array, d in adapter(seed)]
                published[name] = (server.publish(step, tensors, meta(name)), tensors)
            for name, (announced, tensors) in published.items():
                transfer = transfers[name]
                fetched = fetch_weights(bus, sock, announced, "r", 5, base=transfer.base(announced),
                                        staging=transfer.staging())  # fmt: skip
                assert_bit_exact(fetched.tensors, tensors)
                transfer.loaded(fetched)
                # Step 4 comes as deltas against the adapter's own step 3, never the other's.
                assert fetched.num_delta_tensors == (2 if step == 4 else 0)
    finally:
        server.stop()
        bus.close()


def test_wait_fetched_waits_for_the_named_adapters_step(served):
    bus, server, sock = served
    announced_a = server.publish(3, adapter(1), meta("a"))
    server.publish(3, adapter(2), meta("b"))
    assert not server.wait_fetched(3, timeout_s=0.1, adapter="a")
    fetcher = threading.Thread(target=fetch_step, args=(bus, sock, announced_a, "replica-0", 5))
    fetcher.start()
    assert server.wait_fetched(3, timeout_s=10, adapter="a")
    fetcher.join()
    assert not server.wait_fetched(3, timeout_s=0.1, adapter="b")  # a's fetch is not b's
    assert not server.wait_fetched(3, timeout_s=0.1)  # unnamed: the adapter published last, b
    assert not server.wait_fetched(3, timeout_s=0, adapter="")  # no full weights held
