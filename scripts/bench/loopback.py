"""The raw baseline of the weight benchmarks (``inference.py``, ``weights.py``): plain pyzmq PUSH ->
PULL of 1 MiB frames over tcp loopback from a spawned process, nothing decoded or checked."""

from __future__ import annotations

import multiprocessing
import time

import zmq


def raw_sender(address: str, num_frames: int) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.connect(address)
    frame = bytes(2**20)
    for _ in range(num_frames + 1):  # the first is the start marker
        sock.send(frame, copy=False)
    sock.close(linger=-1)
    context.term()


def raw_loopback_mb_s(num_frames: int = 300, repeats: int = 3) -> float:
    """Best MB/s of plain pyzmq PUSH -> PULL of 1 MiB frames from a spawned process over tcp loopback."""
    spawn = multiprocessing.get_context("spawn")
    best = 0.0
    with zmq.Context() as context:
        for _ in range(repeats):
            sock = context.socket(zmq.PULL)
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            process = spawn.Process(target=raw_sender, args=(f"tcp://127.0.0.1:{port}", num_frames))
            process.start()
            sock.recv()
            started = time.perf_counter()
            for _ in range(num_frames):
                sock.recv(copy=False)
            best = max(best, num_frames * 2**20 / 1e6 / (time.perf_counter() - started))
            process.join(60)
            sock.close(linger=0)
    return best
