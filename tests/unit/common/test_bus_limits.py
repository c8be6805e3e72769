"""Decode limits on real sockets: what is rejected, where it is counted, what reaches Python."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from rlbus.abus import AsyncBus, AsyncPublisher
from rlbus.bus import Bus, PeerUnreachable, remaining_ms
from rlbus.codec import encode
from rlbus.messages import Ack, Hello, MetricsReport, WeightsBucket
from rlbus.pubsub import Publisher, Subscriber, TelemetryClient

DEADLINE_S = 30.0


def raw_peer(socket_type: int, address: str) -> zmq.Socket:
    """A plain zmq socket, as a hostile or broken peer would use."""
    sock = zmq.Context.instance().socket(socket_type)
    sock.linger = 0
    sock.connect(address)
    return sock


def bucket(num_bytes: int) -> WeightsBucket:
    return WeightsBucket(step=1, bucket=0, names=["w"], tensors=[np.zeros(num_bytes, dtype=np.uint8)])


def test_limits_come_from_the_bus_config(bus_config, endpoint):
    limits = {"max_frames": 5, "max_header_bytes": 2048, "max_frame_bytes": 4096, "max_payload_bytes": 6000}
    with Bus(bus_config.model_copy(update=limits)) as bus:
        pull = bus.bind(zmq.PULL, endpoint("limits"), role="weights")
        raw = raw_peer(zmq.PUSH, pull.address)
        try:
            raw.send_multipart(encode(WeightsBucket(step=1, bucket=0, names=["a", "b"],
                                                    tensors=[np.zeros(3001, np.uint8)] * 2)))  # fmt: skip
            raw.send_multipart(encode(WeightsBucket(step=1, bucket=0, names=list("abcd"),
                                                    tensors=[np.zeros(1, np.uint8)] * 4)))  # fmt: skip
            raw.send_multipart(encode(Ack(ref="x" * 3000)))
            raw.send_multipart(encode(bucket(4000)))
            assert bus.recv(pull, DEADLINE_S, WeightsBucket).tensors[0].nbytes == 4000
        finally:
            raw.close()
        assert bus.stats.decode_errors == {"weights": 3}
        assert bus.stats.rejected_reasons == {"payload_too_large": 1, "too_many_frames": 1, "header_too_large": 1}


def test_a_frame_over_max_frame_bytes_never_reaches_python(bus_config, endpoint):
    with Bus(bus_config.model_copy(update={"max_frame_bytes": 4096})) as bus:
        pull = bus.bind(zmq.PULL, endpoint("big"), role="results")
        monitor = pull.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        oversized, good = raw_peer(zmq.PUSH, pull.address), raw_peer(zmq.PUSH, pull.address)
        try:
            oversized.send_multipart(encode(bucket(8192)))
            # libzmq drops the sender's connection when the frame's size is announced.
            assert monitor.poll(DEADLINE_S * 1000), "the oversized sender was never disconnected"
            assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
            good.send_multipart(encode(Ack(ref="still serving")))
            assert bus.recv(pull, DEADLINE_S, Ack) == Ack(ref="still serving")
            assert bus.stats.decode_errors == {}  # nothing of the big frame was seen by Python
        finally:
            pull.disable_monitor()
            monitor.close(linger=0)
            oversized.close()
            good.close()


def test_rejections_become_bus_metrics_in_telemetry(bus, endpoint):
    monitor = bus.bind(zmq.PULL, endpoint("telemetry"), role="monitor")
    results = bus.bind(zmq.PULL, endpoint("results"), role="results")
    telemetry = TelemetryClient(bus, "orchestrator", "orchestrator-0", address=monitor.address)
    telemetry.metrics(1, {"loss/mean": 1.0})
    assert bus.recv(monitor, DEADLINE_S, MetricsReport).metrics == {"loss/mean": 1.0}  # nothing rejected yet

    raw = raw_peer(zmq.PUSH, results.address)
    try:
        raw.send_multipart([b"random", b"bytes"])
        raw.send_multipart(encode(Hello(sender="not expected here")))
        raw.send_multipart(encode(Ack(ref="ok")))
        bus.recv(results, DEADLINE_S, Ack)
    finally:
        raw.close()
    telemetry.metrics(2, {"loss/mean": 0.5})
    assert bus.recv(monitor, DEADLINE_S, MetricsReport).metrics == {
        "bus/rejected_messages": 2.0, "bus/rejected_by_socket/results": 2.0,
        "bus/rejected_by_reason/bad_envelope": 1.0, "bus/rejected_by_reason/unexpected_type": 1.0,
        "loss/mean": 0.5,
    }  # fmt: skip


def pump_until(publisher: Publisher, condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {DEADLINE_S}s")
        publisher.pump(0.05)


def test_publisher_counts_what_is_not_a_subscription(bus, endpoint):
    publisher = Publisher(bus, endpoint("announce"), sender="trainer")
    raw = raw_peer(zmq.XSUB, publisher.address)
    try:
        raw.send(b"\x02not a subscription")
        raw.send_multipart([b"\x01two", b"frames"])
        pump_until(publisher, lambda: bus.stats.decode_errors["announce"] == 2, "two rejected frames")
        assert bus.stats.rejected_reasons == {"not_a_subscription": 2}
        subscriber = Subscriber(bus, publisher.address)
        pump_until(publisher, lambda: subscriber.sock.poll(0), "Hello for a real subscriber")
        assert subscriber.wait_ready(DEADLINE_S).sender == "trainer"
    finally:
        raw.close()


def test_async_publisher_counts_what_is_not_a_subscription(bus_config, endpoint):
    async def scenario(bus: AsyncBus) -> None:
        publisher = AsyncPublisher(bus, endpoint("announce"), sender="trainer")
        raw = raw_peer(zmq.XSUB, publisher.address)
        try:
            for i in range(3):
                raw.send(b"\x07" + bytes([i]))
            deadline = time.monotonic() + DEADLINE_S
            while bus.stats.decode_errors["announce"] < 3 and remaining_ms(deadline):
                await publisher.pump(0.05)
        finally:
            raw.close()

    with AsyncBus(bus_config) as bus:
        asyncio.run(scenario(bus))
        assert dict(bus.stats.rejected_reasons) == {"not_a_subscription": 3}


def test_a_router_does_not_block_on_a_peer_that_never_reads(bus_config, endpoint):
    with Bus(bus_config.model_copy(update={"send_hwm": 5})) as bus:
        router = bus.bind(zmq.ROUTER, endpoint("view"), role="view")
        lazy = raw_peer(zmq.DEALER, router.address)
        lazy.rcvhwm = 5
        try:
            lazy.send_multipart(encode(Ack(ref="hello")))
            identity, _ = bus.recv(router, DEADLINE_S, Ack)
            with pytest.raises(PeerUnreachable, match="is not reading its replies"):
                for _ in range(1_000_000):  # far more than the queues and kernel buffers hold
                    bus.send(router, Ack(ref="reply" * 100), identity)
        finally:
            lazy.close()
