"""Replica-to-replica weight fan-out: a relay serves the step it verified, a peer checks it against the
trainer's manifest and falls back to the trainer on a refusal, a silence or a corrupt bucket."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import zmq

from rlbus.bus import Bus
from rlbus.config import BusConfig
from rlbus.messages import Refused, WeightsAnnounced, WeightsBucket, WeightsFetch, WeightsQuery
from rlbus.weights import ReplicaTransfer, Staging, WeightServer, WeightStore, fetch_weights
from rlbus.weights_fetch import FetchedStep
from rlbus.weights_relay import WeightRelay, WeightSources, fetch_from_sources
from tests.conftest import free_tcp_port

CONFIG = BusConfig(linger_ms=0, request_timeout_s=5)


def model(seed: int) -> list[tuple[str, np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    return [
        ("embed.weight", rng.standard_normal((64, 256), dtype=np.float32), "float32"),  # 64 KiB: chunked
        ("layer.0.weight", rng.standard_normal((128, 64), dtype=np.float32), "float32"),
        ("layer.0.bias", np.arange(8, dtype=np.float32) + seed, "float32"),
        ("norm.bf16", np.arange(3000, dtype=np.uint16) + seed, "bfloat16"),
    ]


@dataclass
class Rig:
    bus: Bus
    trainer: WeightServer
    relay: WeightRelay

    def sources(self, *upstream: str, wait_s: float = 2.0) -> WeightSources:
        return WeightSources(self.trainer.fetch_address, upstream, answer_timeout_s=0.5, wait_s=wait_s)

    def relay_fetches(self, announced: WeightsAnnounced, staging: Staging, transfer: ReplicaTransfer | None = None):
        """What a replica with a relay does: fetch into its buffers, relaying each bucket once verified."""
        base = transfer.base(announced) if transfer is not None else None
        return fetch_from_sources(CONFIG, announced, "relay-replica", self.sources(), base, staging, relay=self.relay)

    def ask(self, message: WeightsFetch | WeightsQuery, timeout_s: float = 5.0):
        sock = self.bus.connect(zmq.DEALER, self.relay.address, "peer")
        self.bus.send(sock, message)
        reply = self.bus.recv(sock, timeout_s, (WeightsBucket, Refused, WeightsAnnounced), "relay's answer")
        sock.close(linger=0)
        return reply


class HeldBackStore(WeightStore):
    """Answers bucket ``held_back`` (step, index) only once ``release`` is set: a trainer whose upload of
    one bucket stalls, so a relay's fetch is provably mid-way while its peer is served."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.held_back: tuple[int, int] | None = None
        self.stalled, self.release = threading.Event(), threading.Event()

    def bucket(self, step: int, index: int, nonce: int = 0, base_step: int | None = None, adapter: str = ""):
        if (step, index) == self.held_back:
            self.stalled.set()
            assert self.release.wait(10), "the test never released the held-back bucket"
        return super().bucket(step, index, nonce, base_step, adapter)


def new_rig(store: WeightStore, wait_s: float = 0.5) -> Rig:
    bus = Bus(CONFIG)
    trainer = WeightServer(bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", store).start()
    relay = WeightRelay(bus, "tcp://127.0.0.1:*", wait_s=wait_s, chunk_bytes=7000).start()
    return Rig(bus, trainer, relay)


def close(rig: Rig) -> None:
    rig.relay.stop()
    rig.trainer.stop()
    rig.bus.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = new_rig(WeightStore(bucket_bytes=40_000, chunk_bytes=5000))
    yield made
    close(made)


def assert_exact(received, sent) -> None:
    assert [(n, d) for n, _, d in received] == [(n, d) for n, _, d in sent]
    for (_, got, _), (_, want, _) in zip(received, sent, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_a_relay_serves_its_verified_step_bit_exact_and_the_trainer_uploads_it_once(rig):
    sent = model(1)
    announced = rig.trainer.publish(1, sent)
    assert announced.num_buckets > 1
    rig.relay_fetches(announced, Staging())
    peer = fetch_from_sources(CONFIG, announced, "peer", rig.sources(rig.relay.address), staging=Staging())
    assert_exact(peer.tensors, sent)
    assert (peer.source, peer.relay_bytes, peer.trainer_bytes) == (rig.relay.address, announced.total_bytes, 0)
    assert rig.trainer.bytes_served == announced.total_bytes, "the trainer sent the step to the relay only"
    assert rig.relay.bytes_served == announced.total_bytes and rig.relay.buckets_served == announced.num_buckets


def test_a_relay_refuses_a_step_it_does_not_hold_and_the_peer_takes_it_from_the_trainer(rig):
    rig.relay_fetches(rig.trainer.publish(1, model(1)), Staging())
    newer = rig.trainer.publish(2, model(2))
    reply = rig.ask(WeightsFetch(replica_id="peer", step=0, bucket=0, nonce=5))
    assert isinstance(reply, Refused) and "step 0 is not held (holds 1" in reply.reason
    started = time.monotonic()
    peer = fetch_from_sources(CONFIG, newer, "peer", rig.sources(rig.relay.address, wait_s=0.5), staging=Staging())
    assert_exact(peer.tensors, model(2))
    assert peer.source == rig.trainer.fetch_address and peer.trainer_bytes == newer.total_bytes
    # Parked for the relay's wait (it never fetched step 2), then refused: not the peer's full timeout.
    assert 0.4 < time.monotonic() - started < CONFIG.request_timeout_s


def test_a_request_parked_for_the_step_being_fetched_is_answered_once_it_is_held(rig):
    first = rig.trainer.publish(1, model(1))
    rig.relay_fetches(first, Staging())
    second = rig.trainer.publish(2, model(2))
    rig.relay.begin_fetch(second)
    reply = rig.ask(WeightsFetch(replica_id="peer", step=1, bucket=0, nonce=3))
    assert isinstance(reply, Refused), "the old step's buffers are being rewritten: refused at once"
    sock = rig.bus.connect(zmq.DEALER, rig.relay.address, "peer")
    rig.bus.send(sock, WeightsFetch(replica_id="peer", step=2, bucket=1, nonce=9))
    assert rig.bus.recv_before(sock, time.monotonic() + 0.1, (WeightsBucket, Refused)) is None, "parked"
    rig.relay.hold(fetch_from_sources(CONFIG, second, "relay-replica", rig.sources(), staging=Staging()))
    bucket = rig.bus.recv(sock, 5, (WeightsBucket, Refused), "the parked bucket")
    assert isinstance(bucket, WeightsBucket) and (bucket.step, bucket.bucket, bucket.nonce) == (2, 1, 9)


def test_a_corrupt_relay_is_caught_and_the_peer_gets_the_exact_step_from_the_trainer(rig):
    sent = model(3)
    announced = rig.trainer.publish(4, sent)
    fetched = rig.relay_fetches(announced, Staging())
    buffer = next(array for name, array, _ in fetched.tensors if name == "layer.0.weight")
    buffer.view(np.uint8)[17] ^= 0x01  # one bit of one byte in the buffer the relay serves from
    peer = fetch_from_sources(CONFIG, announced, "peer", rig.sources(rig.relay.address), staging=Staging())
    assert_exact(peer.tensors, sent)
    assert peer.source == rig.trainer.fetch_address and peer.relay_bytes == 0
    assert rig.trainer.bytes_served == 2 * announced.total_bytes


def test_an_unreachable_relay_falls_back_to_the_trainer_within_the_short_timeout(rig):
    sent = model(5)
    announced = rig.trainer.publish(1, sent)
    nobody = f"tcp://127.0.0.1:{free_tcp_port()}"
    started = time.monotonic()
    peer = fetch_from_sources(CONFIG, announced, "peer", rig.sources(nobody, wait_s=30))
    assert time.monotonic() - started < 0.5 + 1.5, "the relay's answer timeout, not its 30 s wait"
    assert_exact(peer.tensors, sent)
    assert peer.source == rig.trainer.fetch_address


def test_malformed_and_hostile_requests_are_refused_and_the_relay_keeps_serving(rig):
    sent = model(6)
    announced = rig.trainer.publish(1, sent)
    rig.relay_fetches(announced, Staging())
    hostile = [
        WeightsFetch(replica_id="x", step=1, bucket=-1),
        WeightsFetch(replica_id="x", step=1, bucket=10**9),
        WeightsFetch(replica_id="x", step=1, bucket=0, adapter="other-run"),
        WeightsQuery(replica_id="x", adapter="other-run"),
    ]
    for message in hostile:
        reply = rig.ask(message)
        assert isinstance(reply, Refused), message
    sock = rig.bus.connect(zmq.DEALER, rig.relay.address, "peer")
    sock.send_multipart([b"not a message", b"\xff" * 10])
    reply = rig.bus.recv(sock, 5, Refused, "refusal of garbage")
    assert reply.request == "unknown" and "unreadable" in reply.reason
    assert rig.relay.num_refused == len(hostile) + 1
    query = rig.ask(WeightsQuery(replica_id="x"))
    assert isinstance(query, WeightsAnnounced) and query.step == 1
    peer = fetch_from_sources(CONFIG, announced, "peer", rig.sources(rig.relay.address))
    assert_exact(peer.tensors, sent)
    assert peer.source == rig.relay.address


def test_a_relay_refuses_parked_requests_when_its_fetch_fails(rig):
    announced = rig.trainer.publish(1, model(7))
    rig.relay.begin_fetch(announced)
    sock = rig.bus.connect(zmq.DEALER, rig.relay.address, "peer")
    rig.bus.send(sock, WeightsFetch(replica_id="peer", step=1, bucket=0, nonce=1))
    assert rig.bus.recv_before(sock, time.monotonic() + 0.1, (WeightsBucket, Refused)) is None, "parked"
    rig.relay.fetch_failed()
    started = time.monotonic()
    reply = rig.bus.recv(sock, 5, (WeightsBucket, Refused), "refusal")
    assert isinstance(reply, Refused) and time.monotonic() - started < 0.4, "at once, not after the wait"


def test_a_relay_that_cannot_bind_says_where():
    with Bus(CONFIG) as bus:
        first = WeightRelay(bus, "tcp://127.0.0.1:*").start()
        try:
            with pytest.raises(Exception, match=f"weight relay could not bind {first.address}"):
                WeightRelay(bus, first.address).start()
        finally:
            first.stop()


def moved(tensors, scale: float = 1e-3):
    """Every float weight moved a little (as one optimizer step): deltas against ``tensors`` pay."""
    rng = np.random.default_rng(99)
    return [(name, (array * (1 + rng.standard_normal(array.shape, dtype=np.float32) * np.float32(scale)))
             .astype(array.dtype) if array.dtype == np.float32 else array + 1, dtype)
            for name, array, dtype in tensors]  # fmt: skip


@pytest.mark.parametrize("delta", [False, True])
def test_a_relay_serves_each_bucket_once_verified_while_its_own_fetch_still_waits_for_the_last(delta):
    store = HeldBackStore(bucket_bytes=20_000, chunk_bytes=5000, delta=delta)
    rig = new_rig(store, wait_s=10)  # the peer's request for the held-back bucket waits until it is released
    owner, results, arrived = ReplicaTransfer(), {}, queue.Queue()
    try:
        sent = model(1)
        if delta:  # the relay holds step 1, and takes step 2 as deltas against it
            owner.loaded(rig.relay_fetches(rig.trainer.publish(1, sent), owner.staging(), owner))
            sent = moved(sent)
        announced = rig.trainer.publish(2, sent)
        last = announced.num_buckets - 1
        assert last >= 2
        store.held_back = (2, last)
        owner_fetch = threading.Thread(target=lambda: results.update(owner=rig.relay_fetches(
            announced, owner.staging(), owner)))  # fmt: skip
        owner_fetch.start()
        assert store.stalled.wait(10), "the relay's fetch reached the last bucket"

        def peer() -> None:
            with Bus(CONFIG) as bus:
                sock = bus.connect(zmq.DEALER, rig.relay.address, "weights")
                results["peer"] = fetch_weights(bus, sock, announced, "peer", 10, retries=0, staging=Staging(),
                                                on_bucket=lambda index, _: arrived.put(index))  # fmt: skip

        peer_fetch = threading.Thread(target=peer)
        peer_fetch.start()
        early = {arrived.get(timeout=10) for _ in range(last)}
        assert early == set(range(last)), "every bucket but the held-back one reached the peer"
        assert owner_fetch.is_alive() and rig.relay.held_step() is None, "...while the relay's fetch still waits"
        store.release.set()
        owner_fetch.join(10)
        peer_fetch.join(10)
    finally:
        store.release.set()
        close(rig)
    peer_step, owner_step = results["peer"], results["owner"]
    assert isinstance(peer_step, FetchedStep) and arrived.get(timeout=1) == last
    assert_exact(peer_step.tensors, sent)
    assert_exact(owner_step.tensors, sent)
    assert (owner_step.num_delta_tensors > 0) == delta
    assert peer_step.num_delta_tensors == 0, "a relay sends the verified full tensors, never deltas"
    assert rig.relay.bytes_served == announced.total_bytes and rig.relay.buckets_served == announced.num_buckets


def bucket_of(fetched: FetchedStep, index: int):
    names = {meta.name for meta in fetched.announced.manifest if meta.bucket == index}
    return [tensor for tensor in fetched.tensors if tensor[0] in names]


def test_begin_fetch_of_the_next_step_forgets_every_verified_bucket_of_the_one_before(rig):
    second = rig.trainer.publish(2, model(2))
    fetched = fetch_from_sources(CONFIG, second, "elsewhere", rig.sources(), staging=Staging())
    rig.relay.begin_fetch(second)
    rig.relay.bucket_ready(2, 0, bucket_of(fetched, 0))
    served = rig.ask(WeightsFetch(replica_id="peer", step=2, bucket=0, nonce=4))
    assert isinstance(served, WeightsBucket) and served.names == [name for name, _, _ in bucket_of(fetched, 0)]
    assert rig.relay.held_step() is None, "a bucket is served mid-fetch, the step is not held yet"

    third = rig.trainer.publish(3, model(3))
    rig.relay.begin_fetch(third)
    reply = rig.ask(WeightsFetch(replica_id="peer", step=2, bucket=0, nonce=5))
    assert isinstance(reply, Refused) and "step 2 is not held" in reply.reason
    rig.relay.bucket_ready(2, 1, bucket_of(fetched, 1))  # late word of the abandoned fetch: ignored
    sock = rig.bus.connect(zmq.DEALER, rig.relay.address, "peer")
    rig.bus.send(sock, WeightsFetch(replica_id="peer", step=3, bucket=1, nonce=6))
    assert rig.bus.recv_before(sock, time.monotonic() + 0.1, (WeightsBucket, Refused)) is None, "parked"
    rig.relay.fetch_failed()
    reply = rig.bus.recv(sock, 5, (WeightsBucket, Refused), "refusal")
    assert isinstance(reply, Refused) and "step 3 is not held" in reply.reason


def test_a_failed_fetch_withdraws_the_buckets_it_had_verified(rig):
    announced = rig.trainer.publish(1, model(1))
    fetched = fetch_from_sources(CONFIG, announced, "elsewhere", rig.sources(), staging=Staging())
    rig.relay.begin_fetch(announced)
    rig.relay.bucket_ready(1, 0, bucket_of(fetched, 0))
    assert isinstance(rig.ask(WeightsFetch(replica_id="peer", step=1, bucket=0, nonce=1)), WeightsBucket)
    rig.relay.fetch_failed()
    assert isinstance(rig.ask(WeightsFetch(replica_id="peer", step=1, bucket=0, nonce=2)), Refused)
