"""The sync bus over real sockets (tcp and ipc): delivery, handshakes, timeouts, bad frames."""

from __future__ import annotations

import queue
import threading
import time

import msgspec
import numpy as np
import pytest
import zmq

from rlbus.bus import Bus, BusTimeout, PeerUnreachable, bind_address
from rlbus.codec import encode
from rlbus.config.base import BusConfig
from rlbus.messages import Ack, Heartbeat, Hello, TaskRequest, WeightsBucket, WeightsFetch
from rlbus.pubsub import Publisher, Subscriber, TelemetryClient


def test_bind_address_replaces_only_the_tcp_host():
    assert bind_address("tcp://127.0.0.1:5550", "0.0.0.0") == "tcp://0.0.0.0:5550"
    assert bind_address("tcp://trainer.local:5553", None) == "tcp://trainer.local:5553"
    assert bind_address("ipc:///tmp/x.sock", "0.0.0.0") == "ipc:///tmp/x.sock"
    with pytest.raises(ValueError, match="tcp://host:port"):
        bind_address("tcp://5550", "0.0.0.0")


def test_sockets_get_options_from_config():
    config = BusConfig(send_hwm=7, linger_ms=123, max_frame_bytes=4096, bind_host="127.0.0.1")
    with Bus(config) as bus:
        router = bus.bind(zmq.ROUTER, "tcp://localhost:*", role="tasks")
        dealer = bus.connect(zmq.DEALER, router.address)
        for sock in (router, dealer):
            assert (sock.sndhwm, sock.rcvhwm, sock.linger) == (7, 7, 123)
            assert sock.getsockopt(zmq.MAXMSGSIZE) == 4096
            assert sock.getsockopt(zmq.IPV6) == 0
        assert router.role == "tasks" and dealer.role == "dealer"
        assert router.address.startswith("tcp://127.0.0.1:")  # bind_host replaced localhost


def test_recv_timeout_names_what_where_and_how_long(bus, endpoint):
    pull = bus.bind(zmq.PULL, endpoint("results"), role="results")
    started = time.monotonic()
    with pytest.raises(BusTimeout) as caught:
        bus.recv(pull, 0.2, TaskRequest, what="task requests from env-workers")
    assert 0.15 < time.monotonic() - started < 2.0
    text = str(caught.value)
    assert "task requests from env-workers" in text and pull.address in text and "0.2s" in text


def test_push_pull_fan_out_delivers_each_message_exactly_once(bus, endpoint, watch_handshakes):
    push = bus.bind(zmq.PUSH, endpoint("tasks"), role="tasks")
    watcher = watch_handshakes(push)
    workers = [bus.connect(zmq.PULL, push.address, role=f"worker-{i}") for i in range(3)]
    watcher.wait(3)  # all connected, so the round robin covers every worker
    num_messages = 300
    for i in range(num_messages):
        bus.send(push, TaskRequest(worker_id="orchestrator", num_tasks=i))

    received: dict[str, list[int]] = {w.role: [] for w in workers}
    poller = zmq.Poller()
    for worker in workers:
        poller.register(worker, zmq.POLLIN)
    deadline = time.monotonic() + 10
    while sum(map(len, received.values())) < num_messages and time.monotonic() < deadline:
        for sock, _ in poller.poll(1000):
            received[sock.role].append(bus.recv(sock, 1.0, TaskRequest).num_tasks)
    everything = sorted(n for numbers in received.values() for n in numbers)
    assert everything == list(range(num_messages))
    assert all(len(numbers) == num_messages // 3 for numbers in received.values()), received
    for worker in workers:
        with pytest.raises(BusTimeout):
            bus.recv(worker, 0.05)


def test_router_dealer_request_reply_with_several_dealers(bus, endpoint):
    router = bus.bind(zmq.ROUTER, endpoint("weights"), role="weights")
    num_dealers, num_requests = 4, 25

    def replica(index: int) -> list[str]:
        dealer = bus.connect(zmq.DEALER, router.address, role=f"replica-{index}")
        fetches = [WeightsFetch(replica_id=f"r{index}", step=3, bucket=b) for b in range(num_requests)]
        return [bus.request(dealer, fetch, Ack, timeout_s=5).ref for fetch in fetches]

    results: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: replica(i)})) for i in range(num_dealers)]
    for thread in threads:
        thread.start()
    identities = set()
    for _ in range(num_dealers * num_requests):
        identity, fetch = bus.recv(router, 10, WeightsFetch, what="weights fetches")
        identities.add(identity)
        bus.send(router, Ack(ref=f"{fetch.replica_id}:{fetch.bucket}"), identity=identity)
    for thread in threads:
        thread.join(10)
    assert len(identities) == num_dealers
    assert results == {i: [f"r{i}:{b}" for b in range(num_requests)] for i in range(num_dealers)}


def test_request_resends_after_a_timeout_then_gives_up(bus, endpoint):
    router = bus.bind(zmq.ROUTER, endpoint("policy"), role="policy")
    dealer = bus.connect(zmq.DEALER, router.address, role="replica")
    served: list[str] = []

    def serve_second_attempt_only() -> None:
        bus.recv(router, 10, TaskRequest)  # first attempt: swallowed
        identity, request = bus.recv(router, 10, TaskRequest)
        served.append(request.worker_id)
        bus.send(router, Ack(ref="second"), identity=identity)

    server = threading.Thread(target=serve_second_attempt_only)
    server.start()
    reply = bus.request(dealer, TaskRequest(worker_id="w", num_tasks=1), Ack, timeout_s=0.3, retries=1)
    server.join(10)
    assert reply == Ack(ref="second") and served == ["w"]

    with pytest.raises(BusTimeout, match=r"Ack reply to TaskRequest after 2 attempt\(s\) within 0.1s"):
        bus.request(dealer, TaskRequest(worker_id="w", num_tasks=1), Ack, timeout_s=0.1, retries=1)


def test_router_refuses_unknown_identities_and_needs_one(bus, endpoint):
    router = bus.bind(zmq.ROUTER, endpoint("tasks"))
    with pytest.raises(PeerUnreachable, match="b'nobody'"):
        bus.send(router, Ack(ref="x"), identity=b"nobody")
    with pytest.raises(ValueError, match="identity"):
        bus.send(router, Ack(ref="x"))


def test_pubsub_handshake_with_a_running_publisher(bus, endpoint):
    publisher = Publisher(bus, endpoint("announce"), sender="trainer")
    commands: queue.Queue = queue.Queue()
    stop = threading.Event()

    def publisher_loop() -> None:  # the publisher's owning loop: pump, publish what is queued
        while not stop.is_set():
            publisher.pump(timeout_s=0.01)
            while not commands.empty():
                publisher.publish(commands.get())
                commands.task_done()

    def publish(messages) -> None:
        for message in messages:
            commands.put(message)
        commands.join()  # returns once the loop has published them all

    thread = threading.Thread(target=publisher_loop)
    thread.start()
    try:
        publish(Ack(ref=f"unheard-{i}") for i in range(5))
        first = Subscriber(bus, publisher.address, role="first")
        assert first.wait_ready(5) == Hello(sender="trainer", nonce=1)
        publish(Ack(ref=str(i)) for i in range(100))
        assert [first.recv(5, Ack).ref for _ in range(100)] == [str(i) for i in range(100)]

        second = Subscriber(bus, publisher.address, role="second")
        assert second.wait_ready(5).sender == "trainer"
        publish(Ack(ref=str(i)) for i in range(100, 200))
        for subscriber in (first, second):  # the first skips the Hello meant for the second
            assert [subscriber.recv(5, Ack).ref for _ in range(100)] == [str(i) for i in range(100, 200)]
            with pytest.raises(BusTimeout, match="announcements"):
                subscriber.recv(0.05, what="announcements")
        assert bus.stats.decode_errors == {}
    finally:
        stop.set()
        thread.join(10)


def test_subscriber_keeps_messages_that_beat_the_hello(bus, endpoint):
    publisher = Publisher(bus, endpoint("announce"), sender="trainer")
    subscriber = Subscriber(bus, publisher.address)
    assert publisher.sock.poll(5000)  # the subscription is live but not yet greeted
    bus.send(publisher.sock, Ack(ref="early"))
    assert publisher.pump() == 1
    assert subscriber.wait_ready(5).nonce == 1
    assert subscriber.recv(5, Ack) == Ack(ref="early")


def test_wait_ready_times_out_without_a_publisher(bus, endpoint):
    subscriber = Subscriber(bus, endpoint("announce", fixed=True).replace("*", "1"))
    with pytest.raises(BusTimeout, match="Hello from the publisher within 0.2s"):
        subscriber.wait_ready(0.2)


def _raw_frames() -> list[list[bytes]]:
    """Malformed messages, each of which the receiver must count and skip."""
    valid = encode(Ack(ref="x"))
    pack = msgspec.msgpack.encode
    return [
        [b"garbage"],                                        # one frame, not an envelope
        [b"\xff\xfe", b"\x80"],                              # envelope is not msgpack
        [pack(["NoSuchMessage", 1, 0]), b"\x80"],            # unknown type
        [pack(["Ack", 99, 0]), valid[1]],                    # unsupported schema version
        [pack(["Ack", 1, 1]), valid[1]],                     # promised buffer missing
        [valid[0], pack({"ref": 5})],                        # wrong field type
        encode(Hello(sender="intruder")),                    # valid, but not expected here
        [valid[0], valid[1], *[b"x"] * 70],                  # more frames than max_frames (64)
    ]  # fmt: skip


def test_malformed_frames_are_counted_and_skipped(bus, endpoint):
    pull = bus.bind(zmq.PULL, endpoint("results"), role="results")
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(pull.address)
    try:
        bad = _raw_frames()
        for frames in bad:
            raw.send_multipart(frames)
        raw.send_multipart(encode(Ack(ref="valid")))
        assert bus.recv(pull, 5, Ack) == Ack(ref="valid")
        assert bus.stats.decode_errors == {"results": len(bad)}
    finally:
        raw.close(linger=0)


def test_router_skips_malformed_frames_and_keeps_the_identity(bus, endpoint):
    router = bus.bind(zmq.ROUTER, endpoint("tasks"), role="tasks")
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.ROUTING_ID, b"worker-7")
    raw.connect(router.address)
    try:
        raw.send_multipart([b"not", b"a", b"message"])
        raw.send_multipart(encode(TaskRequest(worker_id="w7", num_tasks=2)))
        identity, request = bus.recv(router, 5, TaskRequest)
        assert (identity, request.num_tasks) == (b"worker-7", 2)
        assert bus.stats.decode_errors["tasks"] == 1
    finally:
        raw.close(linger=0)


def test_arrays_round_trip_zero_copy(bus, endpoint):
    pull = bus.bind(zmq.PULL, endpoint("weights"))
    push = bus.connect(zmq.PUSH, pull.address)
    tensors = [np.random.default_rng(0).standard_normal((512, 1024), dtype=np.float32), np.arange(10, dtype=np.int64)]
    bus.send(push, WeightsBucket(step=2, bucket=1, names=["w", "idx"], tensors=tensors))
    received = bus.recv(pull, 5, WeightsBucket)
    for sent, got in zip(tensors, received.tensors, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        np.testing.assert_array_equal(got, sent)
        assert not got.flags.owndata
        base = got
        while isinstance(base, np.ndarray):
            base = base.base
        # The array views the memory of the received zmq frame: nothing was copied.
        assert isinstance(base, memoryview) and isinstance(base.obj, zmq.Frame)


def test_telemetry_never_blocks_without_a_monitor_and_delivers_later(endpoint):
    config = BusConfig(send_hwm=10, linger_ms=0)
    address = endpoint("telemetry", fixed=True)
    with Bus(config) as bus:
        telemetry = TelemetryClient(bus, "env-worker", "env-worker-1", address)
        started = time.monotonic()
        outcomes = [telemetry.heartbeat(step=i) for i in range(500)]
        assert time.monotonic() - started < 2.0
        num_sent = sum(outcomes)
        assert 1 <= num_sent <= 2 * config.send_hwm
        assert telemetry.num_dropped == 500 - num_sent == bus.stats.dropped["telemetry"]

        monitor = bus.bind(zmq.PULL, address, role="monitor")
        heartbeats = [bus.recv(monitor, 5, Heartbeat) for _ in range(num_sent)]
        assert [h.step for h in heartbeats] == list(range(num_sent))  # the oldest were kept
        assert heartbeats[0].replica_id == "env-worker-1" and heartbeats[0].pid == telemetry.pid
        assert heartbeats[0].started_at <= heartbeats[0].sent_at
        with pytest.raises(BusTimeout):
            bus.recv(monitor, 0.1)
        assert telemetry.event("finished", "done", level="info", steps=3)
        assert telemetry.metrics(3, {"loss/mean": 0.5})
        assert [type(bus.recv(monitor, 5)).__name__ for _ in range(2)] == ["Event", "MetricsReport"]
