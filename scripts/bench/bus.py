"""Throughput of the bus over tcp loopback, against raw pyzmq with equally sized frames.

Two payloads, each sent PUSH -> PULL from a spawned sender process to this one:

* rollouts: ``RolloutResult`` of 16 rollouts x 300 tokens (ids, logprobs, mask as lists),
  encoded by the sender and decoded by the receiver (codec + ``Bus.send``/``Bus.recv``);
* weights:  ~100 MB of ``WeightsBucket`` messages, 2 float32 tensors of 2 MB each.

The raw baseline sends pre-made bytes frames of the same sizes with plain pyzmq and
receives them without decoding. Each pass is timed from the receiver getting the
sender's marker message to the last message; msgs/s and MB/s are the best of
``--repeats`` passes, ``median`` the median MB/s, ours/raw the ratio of the best.

    python scripts/bench/bus.py [--rollout-messages 2000] [--weights-mb 100] [--repeats 7]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
from typing import Any

import numpy as np
import zmq

from rlbus.bus import Bus
from rlbus.codec import encode
from rlbus.config.base import BusConfig
from rlbus.logging import setup_logging
from rlbus.messages import Hello, Message, Rollout, RolloutResult, Turn, WeightsBucket

CONFIG = BusConfig(linger_ms=5000)
TIMEOUT_S = 60.0


def rollout_result(seed: int = 0) -> RolloutResult:
    """One group of 16 rollouts, 60 prompt + 240 completion tokens each."""
    rng = random.Random(seed)

    def rollout(i: int) -> Rollout:
        turn = Turn(
            prompt_ids=[rng.randrange(150_000) for _ in range(60)],
            completion_ids=[rng.randrange(150_000) for _ in range(240)],
            completion_logprobs=[-rng.random() * 5 for _ in range(240)],
            completion_mask=[True] * 240,
            policy_step=7,
        )
        return Rollout(rollout_id=f"r{i}", turns=[turn], reward=rng.random(), prompt_text="q" * 250,
                       completion_text="a" * 1000, timing={"generate": 1.5, "score": 0.01})  # fmt: skip

    return RolloutResult(task_id="task-1", worker_id="env-worker-0", env_id="math", example_id=3,
                         rollouts=[rollout(i) for i in range(16)])  # fmt: skip


def weights_bucket(bucket: int, tensor_mb: int = 2) -> WeightsBucket:
    tensors = [np.full(tensor_mb * 2**18, bucket + i, dtype=np.float32) for i in range(2)]
    return WeightsBucket(step=1, bucket=bucket, names=[f"layer{bucket}.a", f"layer{bucket}.b"], tensors=tensors)


def messages(payload: str, count: int) -> list[Message]:
    if payload == "rollouts":
        return [rollout_result()] * count  # the same object: encoding is still done per send
    return [weights_bucket(i) for i in range(count)]


def wire_bytes(message: Message) -> int:
    return sum(len(memoryview(frame)) for frame in encode(message))


def sender(payload: str, mode: str, count: int, repeats: int, address: str, go: Any) -> None:
    """Child process: build everything first; then per pass, when told to go, a marker and the stream."""
    setup_logging("bench-sender", None, level="warning")
    batch = messages(payload, count)
    raw_frames = [[bytes(len(memoryview(f))) for f in encode(m)] for m in batch] if mode == "raw" else []
    with Bus(CONFIG) as bus:
        sock = bus.connect(zmq.PUSH, address, role="bench")
        for _ in range(repeats):
            go.acquire()  # the receiver has finished the previous pass: nothing is queued
            if mode == "raw":
                sock.send_multipart([b"start"])
                for frames in raw_frames:
                    sock.send_multipart(frames, copy=False)
            else:
                bus.send(sock, Hello(sender="bench"))
                for message in batch:
                    bus.send(sock, message)


def receive(payload: str, mode: str, count: int, repeats: int) -> list[float]:
    """Seconds from each pass's marker to the last of its ``count`` messages, received (and decoded) here."""
    context = multiprocessing.get_context("spawn")
    go = context.Semaphore(0)
    passes = []
    with Bus(CONFIG) as bus:
        sock = bus.bind(zmq.PULL, "tcp://127.0.0.1:*", role="bench")
        process = context.Process(target=sender, args=(payload, mode, count, repeats, sock.address, go))
        process.start()
        expected = RolloutResult if payload == "rollouts" else WeightsBucket
        for _ in range(repeats):
            go.release()
            if mode == "raw":
                assert sock.poll(TIMEOUT_S * 1000), "no marker from the sender"
                sock.recv_multipart()
                started = time.perf_counter()
                for _ in range(count):
                    assert sock.poll(TIMEOUT_S * 1000), "sender stopped"
                    sock.recv_multipart(copy=False)
            else:
                bus.recv(sock, TIMEOUT_S, Hello, what="the sender's start marker")
                started = time.perf_counter()
                for _ in range(count):
                    bus.recv(sock, TIMEOUT_S, expected, what=f"{payload} messages")
            passes.append(time.perf_counter() - started)
        process.join(TIMEOUT_S)
        if bus.stats.decode_errors:
            raise RuntimeError(f"decode errors during the benchmark: {bus.stats.decode_errors}")
    return passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollout-messages", type=int, default=2000)
    parser.add_argument("--weights-mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    setup_logging("bench", None, level="warning")

    rows = []
    for payload, count in {"rollouts": args.rollout_messages, "weights": max(1, args.weights_mb // 4)}.items():
        size = wire_bytes(messages(payload, 1)[0])
        seconds = {mode: sorted(receive(payload, mode, count, args.repeats)) for mode in ("ours", "raw")}
        rows.append((payload, count, size, seconds))

    header = (
        f"{'payload':<9} {'msgs':>5} {'KB/msg':>7} {'mode':<5} {'msgs/s':>7} {'MB/s':>6} {'median':>6} {'ours/raw':>8}"
    )
    sys.stdout.write(header + "\n")
    for payload, count, size, seconds in rows:
        best = {mode: count / s[0] for mode, s in seconds.items()}
        for mode in ("ours", "raw"):
            median_mb = count * size / seconds[mode][len(seconds[mode]) // 2] / 1e6
            ratio = f"{best['ours'] / best['raw']:.2f}" if mode == "ours" else ""
            sys.stdout.write(f"{payload:<9} {count:>5} {size / 1e3:>7.1f} {mode:<5} {best[mode]:>7.0f} "
                             f"{best[mode] * size / 1e6:>6.0f} {median_mb:>6.0f} {ratio:>8}\n")  # fmt: skip


if __name__ == "__main__":
    main()
