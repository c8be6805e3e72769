"""Collective weight transport (``weight_transport = "collective"``) against raw zmq loopback.

A trainer-side :class:`WeightBroadcaster` in this process and ``--replicas`` receiver processes
(spawned, each a :class:`WeightReceiver` as in a vLLM worker) on one machine. Per step: the
trainer copies the step into its flat bucket buffers and broadcasts it; each replica checks every
tensor's xxh3 against the announcement (as before a load) and reports. Figures, best of the steps:

* broadcast: from ``submit`` (copy included) until every replica received the bytes;
* publish -> verified: until every replica also checked every tensor;
* raw loopback: plain pyzmq PUSH -> PULL of 1 MiB frames (``scripts/bench/loopback.py``), the
  ceiling of the bus path on this machine.

The backend is ``auto``: NCCL where CUDA is (one GPU per process: trainer on 0, replica i on i),
gloo over TCP loopback otherwise. ``--quick``: a 64 MB model, 2 steps.

    python scripts/bench/weights_collective.py [--quick] [--replicas N] [--megabytes M] [--steps S]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for scripts.bench

from scripts.bench.loopback import raw_loopback_mb_s

LAYER_BYTES = 16 << 20
SMOLLM2_BYTES = 538_070_408
"""About SmolLM2-135M's weights in float32."""


def synthetic_model(total_bytes: int, seed: int) -> list[tuple[str, np.ndarray, str]]:
    """float32 tensors of 16 MiB (the last smaller) adding up to ``total_bytes``."""
    rng = np.random.default_rng(seed)
    tensors, left = [], total_bytes // 4
    while left > 0:
        count = min(left, LAYER_BYTES // 4)
        tensors.append((f"layers.{len(tensors)}.weight", rng.standard_normal(count, dtype=np.float32), "float32"))
        left -= count
    return tensors


def receiver(settings: dict, inbox: mp.Queue, outbox: mp.Queue) -> None:
    import msgspec
    import torch

    from rlbus.messages import WeightsAnnounced
    from rlbus.services.inference.weight_collective import GroupSettings, WeightReceiver, receive_broadcast

    group_settings = GroupSettings(**settings)
    if torch.cuda.is_available():
        torch.cuda.set_device(group_settings.rank)
    receiver = WeightReceiver(group_settings).start()
    outbox.put("started")
    while (item := inbox.get()) is not None:
        announced = msgspec.convert(item, WeightsAnnounced)
        broadcast = receive_broadcast(announced, receiver)
        outbox.put((announced.step, broadcast is not None, time.perf_counter()))
        if broadcast is not None:
            broadcast.release()
    receiver.stop()


def run(total_bytes: int, num_replicas: int, steps: int) -> dict[str, float]:
    import msgspec
    import torch

    from rlbus.services.trainer.weight_broadcast import WeightBroadcaster
    from rlbus.weights import WeightStore
    from tests.conftest import free_tcp_port

    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    broadcaster = WeightBroadcaster(f"127.0.0.1:{free_tcp_port()}", num_replicas, "auto", 120.0).start()
    spawn = mp.get_context("spawn")
    queues = [(spawn.Queue(), spawn.Queue()) for _ in range(num_replicas)]
    settings = {"address": broadcaster.address, "size": num_replicas + 1, "backend": broadcaster.backend,
                "timeout_s": 120.0}  # fmt: skip
    processes = [spawn.Process(target=receiver, args=({**settings, "rank": rank + 1}, *queues[rank]), daemon=True)
                 for rank in range(num_replicas)]  # fmt: skip
    for process in processes:
        process.start()
    for _, outbox in queues:
        assert outbox.get(timeout=300) == "started"
    deadline = time.monotonic() + 300
    while not (group := broadcaster.ready_group()):
        assert time.monotonic() < deadline, "the weight group did not form"
        time.sleep(0.05)
    store, best = WeightStore(bucket_bytes=64 << 20), {"broadcast": 0.0, "verified": 0.0}
    try:
        for step in range(1, steps + 1):
            tensors = synthetic_model(total_bytes, step)
            announced = store.add(step, tensors, broadcast_group=group)
            started = time.perf_counter()
            assert broadcaster.submit(announced, {name: array for name, array, _ in tensors})
            for inbox, _ in queues:
                inbox.put(msgspec.to_builtins(announced))
            assert broadcaster.wait_idle(600), "broadcast did not finish"
            sent = time.perf_counter()
            reports = [outbox.get(timeout=600) for _, outbox in queues]
            assert all(ok for _, ok, _ in reports), f"a replica refused step {step}: {reports}"
            verified = max(at for _, _, at in reports)
            best["broadcast"] = max(best["broadcast"], total_bytes / 1e6 / (sent - started))
            best["verified"] = max(best["verified"], total_bytes / 1e6 / (verified - started))
    finally:
        for inbox, _ in queues:
            inbox.put(None)
        for process in processes:
            process.join(timeout=60)
        broadcaster.stop()
    return best | {"backend": broadcaster.backend}  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MB model, 2 steps")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--megabytes", type=int, default=None, help="model size (default: SmolLM2-135M's)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    total = args.megabytes * 10**6 if args.megabytes else (64 * 10**6 if args.quick else SMOLLM2_BYTES)
    steps = args.steps or (2 if args.quick else 3)
    result = run(total, args.replicas, steps)
    raw = raw_loopback_mb_s(num_frames=100 if args.quick else 300)
    print(f"model {total / 1e6:.0f} MB, {args.replicas} replica(s), {result['backend']}, best of {steps} step(s)")
    print(f"  broadcast (copy + send):        {result['broadcast']:8.0f} MB/s  ({result['broadcast'] / raw:.2f}x raw)")
    print(f"  publish -> verified by all:     {result['verified']:8.0f} MB/s  ({result['verified'] / raw:.2f}x raw)")
    print(f"  raw zmq loopback (1 MiB frames): {raw:7.0f} MB/s")


if __name__ == "__main__":
    main()
