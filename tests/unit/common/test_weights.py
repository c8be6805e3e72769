"""Weight transfer: store bucketing, serving over real sockets, corruption detection."""

import socket
import threading
import time
from typing import Self

import numpy as np
import pytest
import zmq

from rlbus.bus import Bus, BusError
from rlbus.config import BusConfig
from rlbus.messages import Refused, WeightsAnnounced, WeightsBucket
from rlbus.pubsub import Subscriber
from rlbus.weights import WeightsCorrupt, WeightServer, WeightStore, checksum, fetch_step, query_latest


def params(scale: float = 1.0) -> list[tuple[str, np.ndarray, str]]:
    rng = np.random.default_rng(0)
    return [
        ("embed.weight", (rng.standard_normal((64, 32)) * scale).astype(np.float32), "float32"),  # 8 KiB
        ("layer.0.weight", (rng.standard_normal((32, 32)) * scale).astype(np.float32), "float32"),  # 4 KiB
        ("layer.0.bias", np.arange(32, dtype=np.float32) * scale, "float32"),
        ("norm.bf16", np.arange(16, dtype=np.uint16), "bfloat16"),
    ]


def test_store_splits_into_bounded_buckets_and_keeps_last_steps():
    store = WeightStore(bucket_bytes=6000, keep_steps=1)
    announced = store.add(1, params())
    assert [m.bucket for m in announced.manifest] == [0, 1, 1, 1]
    assert announced.num_buckets == 2 and announced.total_bytes == 8192 + 4096 + 128 + 32
    assert announced.manifest[3].dtype == "bfloat16"
    bucket = store.bucket(1, 1)
    assert isinstance(bucket, WeightsBucket) and bucket.names == ["layer.0.weight", "layer.0.bias", "norm.bf16"]
    store.add(2, params(2.0))
    assert store.latest().step == 2
    refused = store.bucket(1, 0)
    assert isinstance(refused, Refused) and "step 1 is not held" in refused.reason
    assert "no bucket 7" in store.bucket(2, 7).reason


@pytest.fixture
def served():
    bus = Bus(BusConfig(request_timeout_s=5))
    server = WeightServer(bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", WeightStore(bucket_bytes=6000)).start()
    yield bus, server
    server.stop()
    bus.close()


def test_a_taken_port_is_reported_at_once_with_the_reason():
    bus = Bus(BusConfig())
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(BusError, match=r"could not bind .*Address already in use"):
            WeightServer(bus, taken, "tcp://127.0.0.1:*", WeightStore(bucket_bytes=64)).start(timeout_s=30)
        assert time.monotonic() - started < 30  # the bind error itself, not the wait running out
    bus.close()


def test_late_joiner_queries_latest_and_fetches_exact_tensors(served):
    bus, server = served
    sock = bus.connect(zmq.DEALER, server.fetch_address, "weights-client")
    assert query_latest(bus, sock, "replica-0", timeout_s=5) is None
    sent = params(3.0)
    server.publish(4, sent)
    announced = query_latest(bus, sock, "replica-0", timeout_s=5)
    assert announced is not None and announced.step == 4
    received = fetch_step(bus, sock, announced, "replica-0", timeout_s=5)
    assert [(n, d) for n, _, d in received] == [(n, d) for n, _, d in sent]
    for (_, got, _), (_, want, _) in zip(received, sent, strict=True):
        np.testing.assert_array_equal(got, want)
    assert server.num_buckets_served == 2


def test_wait_fetched_returns_once_a_replica_holds_every_bucket_of_the_step(served):
    bus, server = served
    sock = bus.connect(zmq.DEALER, server.fetch_address, "weights-client")
    announced = server.publish(5, params())
    assert not server.wait_fetched(5, timeout_s=0.2)  # nobody fetched it yet
    assert not server.wait_fetched(4, timeout_s=0)  # not the step held
    fetcher = threading.Thread(target=fetch_step, args=(bus, sock, announced, "replica-0", 5))
    fetcher.start()
    assert server.wait_fetched(5, timeout_s=10)
    fetcher.join()


def test_subscriber_hears_announcements_after_handshake(served):
    bus, server = served
    subscriber = Subscriber(bus, server.announce_address)
    subscriber.wait_ready(timeout_s=10)
    server.publish(7, params())
    announced = subscriber.recv(timeout_s=10, expected=WeightsAnnounced)
    assert announced.step == 7 and len(announced.manifest) == 4


def test_corrupt_tensor_is_refused_before_anything_is_returned(served):
    bus, server = served
    tensors = params()
    announced = server.publish(1, tensors)
    tensors[2][1][5] += 1.0  # the stored array changes after its checksum was taken
    sock = bus.connect(zmq.DEALER, server.fetch_address, "weights-client")
    with pytest.raises(WeightsCorrupt, match="checksum mismatch on tensor layer.0.bias"):
        fetch_step(bus, sock, announced, "replica-0", timeout_s=5)


def test_step_no_longer_held_is_reported(served):
    bus, server = served
    old = server.publish(1, params())
    server.publish(2, params(2.0))
    sock = bus.connect(zmq.DEALER, server.fetch_address, "weights-client")
    with pytest.raises(WeightsCorrupt, match="refused bucket 0 of step 1: step 1 is not held"):
        fetch_step(bus, sock, old, "replica-0", timeout_s=5)


class LateFirstReply:
    """A ROUTER between a client and the weight server that holds the reply to the client's
    first request until the client has resent it: the reply arrives late, after the retry."""

    def __init__(self, server_address: str) -> None:
        self.server_address = server_address
        self.address = ""
        self.num_requests = 0
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not bind"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with Bus(BusConfig(linger_ms=0)) as bus:
            front = bus.bind(zmq.ROUTER, "tcp://127.0.0.1:*", "late-front")
            back = bus.connect(zmq.DEALER, self.server_address, "late-back")
            self.address = front.address
            self._ready.set()
            poller = zmq.Poller()
            poller.register(front, zmq.POLLIN)
            poller.register(back, zmq.POLLIN)
            held: list[list[bytes]] = []
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if front in events:
                    identity, *frames = front.recv_multipart()
                    self.num_requests += 1
                    back.send_multipart(frames)
                if back in events:
                    reply = [identity, *back.recv_multipart()]
                    if self.num_requests == 1:
                        held.append(reply)
                    else:
                        front.send_multipart(reply)
                if held and self.num_requests >= 2:  # the retry went through: now the late reply
                    front.send_multipart(held.pop())


def test_a_late_reply_to_a_resent_request_is_not_read_as_the_next_bucket(served):
    bus, server = served
    sent = params()
    announced = server.publish(1, sent)
    with LateFirstReply(server.fetch_address) as late:
        sock = bus.connect(zmq.DEALER, late.address, "weights-client")
        # One request in flight, so bucket 1 is asked only after bucket 0's (late) reply.
        received = fetch_step(bus, sock, announced, "replica-0", timeout_s=0.5, retries=2, window=1)
    assert late.num_requests == 3, "bucket 0 sent twice (the first reply was late), bucket 1 once"
    assert [name for name, _, _ in received] == [name for name, _, _ in sent]
    for (_, got, _), (_, want, _) in zip(received, sent, strict=True):
        np.testing.assert_array_equal(got, want)


def test_checksum_is_crc_of_raw_bytes():
    array = np.arange(10, dtype=np.float32)
    assert checksum(array) == checksum(array.copy()) != checksum(array + 1)
