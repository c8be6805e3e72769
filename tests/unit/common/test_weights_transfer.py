"""Weight transfer at speed: chunked tensors, several buckets in flight, reused receive buffers,
and delta mode (exact reconstruction, fallback to full tensors, refusal of a wrong base)."""

import threading
import time

import numpy as np
import pytest
import zmq

from rlbus.bus import Bus
from rlbus.config import BusConfig
from rlbus.messages import WeightsBucket, WeightsFetch
from rlbus.weight_codec import XOR_ZSTD, WeightsCorrupt, checksum, decode_delta, encode_delta, hasher
from rlbus.weights import HeldStep, ReplicaTransfer, Staging, WeightServer, WeightStore, fetch_weights


def model(seed: int = 0) -> list[tuple[str, np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    return [
        ("embed.weight", rng.standard_normal((64, 256), dtype=np.float32) * 0.02, "float32"),  # 64 KiB
        ("layer.0.weight", rng.standard_normal((128, 64), dtype=np.float32) * 0.02, "float32"),  # 32 KiB
        ("layer.0.bias", np.arange(8, dtype=np.float32), "float32"),
        ("norm.bf16", np.arange(3000, dtype=np.uint16), "bfloat16"),
    ]


def updated(tensors, scale: float = 1e-3, seed: int = 1):
    """Every weight moved by about ``scale`` of itself, like one optimizer step."""
    rng = np.random.default_rng(seed)
    return [(n, (a * (1 + rng.standard_normal(a.shape) * scale)).astype(a.dtype), d) for n, a, d in tensors]


@pytest.fixture
def serve():
    bus = Bus(BusConfig(request_timeout_s=5))
    servers: list[WeightServer] = []

    def start(store: WeightStore) -> tuple[Bus, WeightServer, zmq.Socket]:
        server = WeightServer(bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", store).start()
        servers.append(server)
        return bus, server, bus.connect(zmq.DEALER, server.fetch_address, "weights-client")

    yield start
    for server in servers:
        server.stop()
    bus.close()


def assert_exact(received, sent) -> None:
    assert [(n, d) for n, _, d in received] == [(n, d) for n, _, d in sent]
    for (_, got, _), (_, want, _) in zip(received, sent, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_chunked_tensors_arrive_exact_into_reused_buffers(serve):
    bus, server, sock = serve(WeightStore(bucket_bytes=40_000, chunk_bytes=5000))
    staging = Staging()
    sent = model()
    first = fetch_weights(bus, sock, server.publish(1, sent), "r", timeout_s=5, window=3, staging=staging)
    assert_exact(first.tensors, sent)
    assert first.wire_bytes == sum(a.nbytes for _, a, _ in sent)
    sent_again = model(seed=2)
    second = fetch_weights(bus, sock, server.publish(2, sent_again), "r", timeout_s=5, window=3, staging=staging)
    assert_exact(second.tensors, sent_again)
    # The second step landed in the first one's buffers: no fresh memory per step.
    assert all(np.shares_memory(a, b) for (_, a, _), (_, b, _) in zip(first.tensors, second.tensors, strict=True))


def test_incremental_hash_equals_the_checksum():
    data = np.random.default_rng(0).integers(0, 255, 10_000, dtype=np.uint8)
    digest = hasher()
    for start in range(0, data.size, 3000):
        digest.update(data[start : start + 3000])
    assert digest.intdigest() == checksum(data) != checksum(data[1:])


class DuplicatingProxy:
    """A ROUTER between a client and the weight server that forwards every reply twice."""

    def __init__(self, server_address: str) -> None:
        self.server_address, self.address = server_address, ""
        self.num_requests = 0
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "proxy did not bind"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with Bus(BusConfig(linger_ms=0)) as bus:
            front = bus.bind(zmq.ROUTER, "tcp://127.0.0.1:*", "dup-front")
            back = bus.connect(zmq.DEALER, self.server_address, "dup-back")
            self.address = front.address
            self._ready.set()
            poller = zmq.Poller()
            poller.register(front, zmq.POLLIN)
            poller.register(back, zmq.POLLIN)
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if front in events:
                    identity, *frames = front.recv_multipart()
                    self.num_requests += 1
                    back.send_multipart(frames)
                if back in events:
                    reply = [identity, *back.recv_multipart()]
                    front.send_multipart(reply)
                    front.send_multipart(reply)


def test_duplicate_replies_with_several_buckets_in_flight_are_skipped(serve):
    bus, server, _ = serve(WeightStore(bucket_bytes=20_000, chunk_bytes=7000))
    sent = model()
    announced = server.publish(1, sent)
    proxy = DuplicatingProxy(server.fetch_address)
    try:
        sock = bus.connect(zmq.DEALER, proxy.address, "weights-client")
        fetched = fetch_weights(bus, sock, announced, "r", timeout_s=5, window=4)
    finally:
        proxy.close()
    assert_exact(fetched.tensors, sent)
    assert proxy.num_requests == announced.num_buckets, "no bucket was asked twice"


def test_delta_reconstructs_the_step_exactly_with_fewer_bytes(serve):
    bus, server, sock = serve(WeightStore(bucket_bytes=40_000, delta=True, chunk_bytes=20_000))
    step1, step2 = model(), updated(model())
    transfer = ReplicaTransfer()
    announced1 = server.publish(1, step1)
    assert announced1.delta
    first = fetch_weights(bus, sock, announced1, "r", 5, base=transfer.base(announced1), staging=transfer.staging())
    transfer.loaded(first)
    announced2 = server.publish(2, step2)
    second = fetch_weights(bus, sock, announced2, "r", 5, base=transfer.base(announced2), staging=transfer.staging())
    assert_exact(second.tensors, step2)
    assert first.num_delta_tensors == 0 and second.num_delta_tensors >= 2
    assert second.wire_bytes < 0.8 * announced2.total_bytes
    assert_exact(first.tensors, step1)  # the base was not written over by the delta fetch


def test_delta_falls_back_to_full_tensors_when_the_trainer_lacks_the_base(serve):
    bus, server, sock = serve(WeightStore(bucket_bytes=40_000, delta=True))
    sent = updated(model())
    announced = server.publish(5, sent)
    unknown = HeldStep(step=3, tensors={name: array for name, array, _ in model()})  # step 3 was never held
    fetched = fetch_weights(bus, sock, announced, "r", 5, base=unknown)
    assert_exact(fetched.tensors, sent)
    assert fetched.num_delta_tensors == 0 and fetched.wire_bytes == announced.total_bytes


def test_a_delta_that_is_not_smaller_travels_raw():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32 - 1, 4096, dtype=np.uint32)
    assert encode_delta(rng.integers(0, 2**32 - 1, 4096, dtype=np.uint32), base) is None  # noise: no gain
    assert encode_delta(base[:100], base) is None  # another shape
    close = base.copy()
    close[::50] ^= 1
    packed = encode_delta(close, base)
    assert packed is not None and packed.nbytes < close.nbytes
    np.testing.assert_array_equal(decode_delta(packed, base, "w"), close)


def test_a_delta_against_another_base_is_refused_not_loaded(serve):
    bus, server, sock = serve(WeightStore(bucket_bytes=40_000, delta=True))
    step1 = model()
    server.publish(1, step1)
    announced = server.publish(2, updated(step1))
    drifted = {name: array.copy() for name, array, _ in step1}
    drifted["layer.0.weight"][3, 3] += 1.0  # the replica's copy of step 1 is not the trainer's
    with pytest.raises(WeightsCorrupt, match="checksum mismatch on tensor layer.0.weight"):
        fetch_weights(bus, sock, announced, "r", 5, base=HeldStep(1, drifted))


def test_damaged_or_oversized_deltas_are_refused():
    base = np.zeros(1000, np.float32)
    close = base.copy()
    close[7] = 1.0
    packed = encode_delta(close, base)
    assert packed is not None
    with pytest.raises(WeightsCorrupt, match="decodes to 4000 bytes, the base has 400"):
        decode_delta(packed, base[:100], "w")
    with pytest.raises(WeightsCorrupt, match="delta of tensor w"):
        decode_delta(np.frombuffer(b"not a zstd frame at all", np.uint8), base, "w")


def fake_trainer(reply_for):
    """A ROUTER that answers each WeightsFetch with ``reply_for(request)``; returns (address, stop)."""
    ready, stop = threading.Event(), threading.Event()
    address: list[str] = []

    def run() -> None:
        with Bus(BusConfig(linger_ms=0)) as bus:
            router = bus.bind(zmq.ROUTER, "tcp://127.0.0.1:*", "fake-trainer")
            address.append(router.address)
            ready.set()
            while not stop.is_set():
                received = bus.recv_before(router, time.monotonic() + 0.05, WeightsFetch)
                if received is not None:
                    identity, request = received
                    bus.send(router, reply_for(request), identity)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)

    def close() -> None:
        stop.set()
        thread.join(10)

    return address[0], close


@pytest.mark.parametrize(
    ("layout", "error"),
    [
        ({"chunks": [1, 2]}, "chunks"),  # three pieces claimed, two sent
        ({"encodings": [XOR_ZSTD, "raw"], "base_step": 1}, "deltas against step 1, this replica holds step None"),
        ({"names": ["a", "intruder"]}, "tensor intruder is not in bucket 0"),
    ],
)
def test_a_bucket_whose_layout_does_not_add_up_is_refused(layout, error):
    sent = model()[:2]
    store = WeightStore(bucket_bytes=1 << 20)
    announced = store.add(1, [("a", sent[0][1], "float32"), ("b", sent[1][1], "float32")])

    def reply_for(request: WeightsFetch) -> WeightsBucket:
        fields = {"names": ["a", "b"], "tensors": [sent[0][1], sent[1][1]]} | layout
        return WeightsBucket(step=request.step, bucket=request.bucket, nonce=request.nonce, **fields)

    address, close = fake_trainer(reply_for)
    try:
        with Bus(BusConfig(linger_ms=0)) as bus:
            sock = bus.connect(zmq.DEALER, address, "weights-client")
            with pytest.raises(WeightsCorrupt, match=error):
                fetch_weights(bus, sock, announced, "r", timeout_s=5)
    finally:
        close()
