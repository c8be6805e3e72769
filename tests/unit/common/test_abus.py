"""The asyncio bus over real sockets: same semantics as the sync one, awaited."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq

from rlbus.abus import AsyncBus, AsyncPublisher, AsyncSubscriber
from rlbus.bus import BusTimeout
from rlbus.codec import encode
from rlbus.messages import Ack, Hello, TaskRequest, WeightsBucket, WeightsFetch
from rlbus.pubsub import TelemetryClient


def run(coroutine_function, bus_config):
    """Run ``coroutine_function(bus)`` on a fresh loop with a fresh AsyncBus."""

    async def main():
        with AsyncBus(bus_config) as bus:
            return await asyncio.wait_for(coroutine_function(bus), 30)

    return asyncio.run(main())


def test_recv_timeout_names_what_where_and_how_long(bus_config, endpoint):
    async def scenario(bus: AsyncBus) -> str:
        pull = bus.bind(zmq.PULL, endpoint("results"), role="results")
        started = time.monotonic()
        with pytest.raises(BusTimeout) as caught:
            await bus.recv(pull, 0.2, TaskRequest, what="rollout results")
        assert 0.15 < time.monotonic() - started < 2.0
        return f"{caught.value}|{pull.address}"

    text, address = run(scenario, bus_config).split("|")
    assert "rollout results" in text and address in text and "0.2s" in text


def test_push_pull_fan_out_and_zero_copy_arrays(bus_config, endpoint):
    async def scenario(bus: AsyncBus) -> None:
        push = bus.bind(zmq.PUSH, endpoint("tasks"))
        workers = [bus.connect(zmq.PULL, push.address, role=f"w{i}") for i in range(3)]
        tensor = np.linspace(0, 1, 300_000, dtype=np.float32)
        for i in range(60):
            await bus.send(push, WeightsBucket(step=i, bucket=0, names=["w"], tensors=[tensor]))

        async def drain(sock) -> list[int]:
            steps = []
            while True:
                try:
                    bucket = await bus.recv(sock, 0.5, WeightsBucket)
                except BusTimeout:
                    return steps
                np.testing.assert_array_equal(bucket.tensors[0], tensor)
                assert isinstance(bucket.tensors[0].base.base.obj, zmq.Frame)  # a view of the frame
                steps.append(bucket.step)

        per_worker = await asyncio.gather(*(drain(w) for w in workers))
        assert sorted(step for steps in per_worker for step in steps) == list(range(60))

    run(scenario, bus_config)


def test_request_reply_with_several_concurrent_dealers(bus_config, endpoint):
    async def scenario(bus: AsyncBus) -> None:
        router = bus.bind(zmq.ROUTER, endpoint("weights"), role="weights")

        async def serve(num_requests: int) -> None:
            for _ in range(num_requests):
                identity, fetch = await bus.recv(router, 10, WeightsFetch, what="weights fetches")
                await bus.send(router, Ack(ref=f"{fetch.replica_id}:{fetch.bucket}"), identity=identity)

        async def replica(index: int) -> list[str]:
            dealer = bus.connect(zmq.DEALER, router.address, role=f"replica-{index}")
            replies = []
            for bucket in range(20):
                fetch = WeightsFetch(replica_id=f"r{index}", step=1, bucket=bucket)
                replies.append((await bus.request(dealer, fetch, Ack, timeout_s=5)).ref)
            return replies

        server = asyncio.create_task(serve(4 * 20))
        results = await asyncio.gather(*(replica(i) for i in range(4)))
        await server
        assert results == [[f"r{i}:{b}" for b in range(20)] for i in range(4)]

    run(scenario, bus_config)


def test_request_gives_up_after_its_retries(bus_config, endpoint):
    async def scenario(bus: AsyncBus) -> None:
        router = bus.bind(zmq.ROUTER, endpoint("policy"))
        dealer = bus.connect(zmq.DEALER, router.address)
        with pytest.raises(BusTimeout, match=r"Ack reply to TaskRequest after 3 attempt\(s\)"):
            await bus.request(dealer, TaskRequest(worker_id="w", num_tasks=1), Ack, timeout_s=0.05, retries=2)
        attempts = [await bus.recv(router, 1, TaskRequest) for _ in range(3)]
        assert {identity for identity, _ in attempts} == {attempts[0][0]}

    run(scenario, bus_config)


def test_pubsub_handshake_and_every_later_message(bus_config, endpoint):
    async def scenario(bus: AsyncBus) -> None:
        publisher = AsyncPublisher(bus, endpoint("announce"), sender="trainer")
        await publisher.publish(Ack(ref="unheard"))

        async def pump_until_greeted() -> None:
            while publisher.num_greetings == 0:
                await publisher.pump(timeout_s=0.05)

        subscriber = AsyncSubscriber(bus, publisher.address)
        hello, _ = await asyncio.gather(subscriber.wait_ready(5), pump_until_greeted())
        assert hello == Hello(sender="trainer", nonce=1) and subscriber.ready
        for i in range(50):
            await publisher.publish(Ack(ref=str(i)))
        assert [(await subscriber.recv(5, Ack)).ref for _ in range(50)] == [str(i) for i in range(50)]
        with pytest.raises(BusTimeout, match="Hello from the publisher"):
            await AsyncSubscriber(bus, publisher.address, role="late").wait_ready(0.1)  # nobody pumps

    run(scenario, bus_config)


def test_malformed_frames_are_counted_and_skipped(bus_config, endpoint):
    async def scenario(bus: AsyncBus) -> dict:
        pull = bus.bind(zmq.PULL, endpoint("results"), role="results")
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.connect(pull.address)
        try:
            raw.send_multipart([b"junk"])
            raw.send_multipart(encode(Hello(sender="unexpected")))
            raw.send_multipart(encode(Ack(ref="valid")))
            assert await bus.recv(pull, 5, Ack) == Ack(ref="valid")
        finally:
            raw.close(linger=0)
        return dict(bus.stats.decode_errors)

    assert run(scenario, bus_config) == {"results": 2}


def test_telemetry_from_an_async_bus_never_blocks(bus_config, endpoint):
    address = endpoint("telemetry", fixed=True)

    async def scenario(bus: AsyncBus) -> None:
        telemetry = TelemetryClient(bus, "orchestrator", "orchestrator-0", address)
        started = time.monotonic()
        num_sent = sum(telemetry.heartbeat(status="waiting", waiting_for="results") for _ in range(3000))
        assert time.monotonic() - started < 2.0
        assert 0 < num_sent < 3000
        assert telemetry.num_dropped == 3000 - num_sent == bus.stats.dropped["telemetry"]

    run(scenario, bus_config)
