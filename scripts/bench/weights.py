"""Weight sync from a trainer's WeightServer to replicas in other processes, against raw loopback.

No vLLM: each replica is a spawned process that subscribes to announcements, fetches every
step with :func:`rlbus.weights.fetch_weights` (verifying each tensor's checksum) and "loads" it by
copying into destination arrays, then reports. Figures, each against raw pyzmq PUSH -> PULL of
1 MiB frames over tcp loopback measured in the same run (as ``scripts/bench/inference.py``), best
of its runs against best of ours (this shared machine's figures vary by 2x from run to run):

* fetch + verify: the replica's fetch time alone;
* publish -> loaded: from ``WeightServer.publish`` (the trainer copying each tensor out, as its
  gather does) until the replica reports the step loaded;
* delta: bytes on the wire per step with and without ``delta`` mode, steps differing by a small
  update of every weight (``--update-scale``);
* fan-out: publish -> every replica loaded, with 1, 2 and 4 replicas, each pulling from the trainer
  and through a relay tree (``--fanout`` k: replica i pulls from replica (i - 1) // k's relay, as
  ``inference.weights_fanout`` arranges), with the bytes the trainer uploaded per step.

Models: SmolLM2-135M (``models/smollm2`` when present, else random tensors of its size) and a
synthetic model of ``--big-gb`` GB. ``--quick`` runs a small smoke version of everything.
``--snapshots`` instead reads weights a real run saved (``weights/step_N`` folders, in step order)
and prints the bytes the trainer would send per step between each two, in full and as deltas.

    python scripts/bench/weights.py [--quick] [--big-gb 4] [--steps 3] [--window 4]
    python scripts/bench/weights.py --snapshots RUN/weights/step_1 RUN/weights/step_2 ...
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq
from loopback import raw_loopback_mb_s  # scripts/bench/loopback.py, beside this script

from rlbus.bus import Bus
from rlbus.config import BusConfig
from rlbus.logging import setup_logging
from rlbus.messages import Hello, MetricsReport, WeightsAnnounced
from rlbus.ports import free_loopback_port
from rlbus.pubsub import Subscriber
from rlbus.weights import NamedArray, PublishBuffers, ReplicaTransfer, WeightServer, WeightStore
from rlbus.weights_relay import WeightRelay, WeightSources, fetch_from_sources

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = ROOT / "models" / "smollm2"
SMOLLM2_BYTES = 538_090_408 - 20_000
TIMEOUT_S = 300.0
SPAWN = multiprocessing.get_context("spawn")


# ------------------------------------------------------------------ models


def synthetic_model(total_bytes: int, layer_bytes: int = 16 << 20) -> list[NamedArray]:
    """float32 tensors of ``layer_bytes`` (the last one smaller) adding up to ``total_bytes``."""
    rng = np.random.default_rng(0)
    tensors: list[NamedArray] = []
    left = total_bytes // 4
    while left > 0:
        count = min(left, layer_bytes // 4)
        tensors.append((f"layers.{len(tensors)}.weight", rng.standard_normal(count, dtype=np.float32) * 0.02,
                        "float32"))  # fmt: skip
        left -= count
    return tensors


def smollm2_model() -> list[NamedArray]:
    if not (SMOLLM2 / "model.safetensors").exists():
        return synthetic_model(SMOLLM2_BYTES)
    from safetensors.numpy import load_file

    return [(name, array, array.dtype.name) for name, array in load_file(str(SMOLLM2 / "model.safetensors")).items()]


def next_step(tensors: list[NamedArray], scale: float, seed: int) -> list[NamedArray]:
    """Every weight moved by about ``scale`` of its size, like one small optimizer step."""
    rng = np.random.default_rng(seed)
    moved = []
    for name, array, dtype in tensors:
        noise = rng.standard_normal(array.shape, dtype=np.float32) * np.float32(scale)
        moved.append((name, (array * (1 + noise)).astype(array.dtype), dtype))
    return moved


def gathered(tensors: list[NamedArray], buffers: PublishBuffers):
    """What the trainer hands the server: each tensor copied out of the model into its host
    buffer, one at a time (as ``rlbus.services.trainer.model.named_arrays`` does)."""
    buffers.begin_step()
    for name, array, dtype in tensors:
        copy = buffers.array(name, array.shape, array.dtype)
        np.copyto(copy, array)
        yield name, copy, dtype


# ----------------------------------------------------------------- replica


def replica_main(replica_id: str, fetch_address: str, announce_address: str, report_address: str,
                 window: int, relay_bind: str = "", upstream: tuple[str, ...] = ()) -> None:  # fmt: skip
    """A replica without vLLM: fetch each announced step (from ``upstream`` relays first, as deltas
    when the trainer offers them), verify it, serve each verified bucket at ``relay_bind`` if set,
    copy it into place, report (as the vLLM worker extension does)."""
    setup_logging("bench-replica", None, level="warning")
    config = BusConfig(linger_ms=0, request_timeout_s=TIMEOUT_S)
    sources = WeightSources(fetch_address, upstream, answer_timeout_s=5.0, wait_s=TIMEOUT_S)
    with Bus(config) as bus:
        relay = WeightRelay(bus, relay_bind, wait_s=TIMEOUT_S).start() if relay_bind else None
        announcements = Subscriber(bus, announce_address)
        announcements.wait_ready(TIMEOUT_S)
        report = bus.connect(zmq.PUSH, report_address, "telemetry")
        bus.send(report, Hello(sender=replica_id))
        loaded: dict[str, np.ndarray] = {}
        transfer = ReplicaTransfer()  # as the vLLM worker keeps it
        while True:
            announced = announcements.recv(3600, WeightsAnnounced)
            started = time.perf_counter()
            # With a relay, each bucket is served to peers as soon as it is verified here.
            fetch = fetch_from_sources(config, announced, replica_id, sources, base=transfer.base(announced),
                                       staging=transfer.staging(), window=window, relay=relay)  # fmt: skip
            fetched = time.perf_counter()
            for name, array, _ in fetch.tensors:
                np.copyto(loaded.setdefault(name, np.empty_like(array)), array)
            transfer.loaded(fetch)
            metrics = {"fetch_s": fetched - started, "load_s": time.perf_counter() - fetched,
                       "wire_bytes": float(fetch.wire_bytes)}  # fmt: skip
            bus.send(report, MetricsReport(service="bench", replica_id=replica_id, step=announced.step,
                                           sent_at=time.time(), metrics=metrics))  # fmt: skip


@dataclass
class StepFigures:
    publish_to_loaded_s: float
    fetch_s: list[float]
    wire_bytes: list[float]
    trainer_bytes: int = 0
    """What the trainer's WeightServer sent for this step (to every replica together)."""
    publish_s: float = 0.0
    """The trainer's part: copying each tensor out (the gather), checksums and bucketing."""
    load_s: list[float] = field(default_factory=list)
    """Each replica's copy of the verified step into place (vLLM's ``load_weights`` copies too)."""


class Trainer:
    """A WeightServer in this process and ``num_replicas`` replica processes."""

    def __init__(self, num_replicas: int, bucket_mb: int, window: int, delta: bool, fanout: int = 0) -> None:
        self.bus = Bus(BusConfig(linger_ms=0))
        store = WeightStore(bucket_bytes=bucket_mb << 20, delta=delta)
        self.server = WeightServer(self.bus, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", store).start()
        self.buffers = PublishBuffers(store.keep_steps + 1)
        self.reports = self.bus.bind(zmq.PULL, "tcp://127.0.0.1:*", "telemetry")
        relays = [f"tcp://127.0.0.1:{free_loopback_port()}" if fanout and i * fanout + 1 < num_replicas else ""
                  for i in range(num_replicas)]  # fmt: skip
        self.replicas = [
            SPAWN.Process(target=replica_main, args=(f"replica-{i}", self.server.fetch_address,
                          self.server.announce_address, self.reports.address, window, relays[i],
                          (relays[(i - 1) // fanout],) if fanout and i else ()), daemon=True)
            for i in range(num_replicas)
        ]  # fmt: skip
        for process in self.replicas:
            process.start()
        for _ in self.replicas:
            self.bus.recv(self.reports, TIMEOUT_S, Hello, "replica ready")

    def step(self, step: int, tensors: list[NamedArray], gather_copy: bool) -> StepFigures:
        started, served_before = time.perf_counter(), self.server.bytes_served
        self.server.publish(step, gathered(tensors, self.buffers) if gather_copy else tensors)
        published = time.perf_counter()
        reports: list[MetricsReport] = []
        while len(reports) < len(self.replicas):
            message = self.bus.recv(self.reports, TIMEOUT_S, MetricsReport, f"step {step} loaded")
            if message.step == step:
                reports.append(message)
        return StepFigures(time.perf_counter() - started, [r.metrics["fetch_s"] for r in reports],
                           [r.metrics["wire_bytes"] for r in reports],
                           self.server.bytes_served - served_before, published - started,
                           [r.metrics["load_s"] for r in reports])  # fmt: skip

    def close(self) -> None:
        for process in self.replicas:
            process.kill()
            process.join(30)
        self.server.stop()
        self.bus.close()


def run_steps(model: list[NamedArray], args: argparse.Namespace, num_replicas: int, delta: bool = False,
              gather_copy: bool = True, fanout: int = 0) -> list[StepFigures]:  # fmt: skip
    """Figures of ``args.steps`` steps after a first one (a full transfer for every replica)."""
    # Full transfers do not depend on the values: only delta mode needs steps that differ.
    steps = [model, next_step(model, args.update_scale, 1)] if delta else [model]
    trainer = Trainer(num_replicas, args.bucket_mb, args.window, delta, fanout)
    try:
        figures = [trainer.step(step, steps[step % len(steps)], gather_copy) for step in range(1, args.steps + 2)]
    finally:
        trainer.close()
    return figures[1:]


# ------------------------------------------------------------------ report


Line = str | tuple[str, float, str]
"""A finished line, or (label, MB/s, what follows): formatted with its ratio to raw at the end."""


def rate(label: str, mb_s: float, unit: str = "MB/s  ") -> tuple[str, float, str]:
    return (f"  {label:<36} {mb_s:9.1f} {unit}", mb_s, "")


def model_lines(label: str, model: list[NamedArray], args: argparse.Namespace, delta: bool,
                gather_copy: bool = True) -> list[Line]:  # fmt: skip
    mb = sum(array.nbytes for _, array, _ in model) / 1e6
    full = run_steps(model, args, 1, gather_copy=gather_copy)
    copy = "" if gather_copy else " (the trainer's copy out of the model not modelled: memory)"
    lines: list[Line] = [f"{label} ({mb:.1f} MB), best of {args.steps} steps{copy}:",
                         rate("fetch + verify", max(mb / f.fetch_s[0] for f in full)),
                         rate("publish -> loaded", max(mb / f.publish_to_loaded_s for f in full)),
                         split_line(min(full, key=lambda f: f.publish_to_loaded_s))]  # fmt: skip
    if delta:
        deltas = run_steps(model, args, 1, delta=True)
        wire = statistics.median(f.wire_bytes[0] for f in deltas) / 1e6
        full_wire = statistics.median(f.wire_bytes[0] for f in full) / 1e6
        lines.append(f"  bytes on the wire per step     {full_wire:9.1f} MB full, {wire:.1f} MB delta "
                     f"({wire / full_wire:.3f} of full)")  # fmt: skip
        lines.append(rate("delta fetch + verify", max(mb / f.fetch_s[0] for f in deltas)))
    return lines


def split_line(figures: StepFigures) -> str:
    """Where publish -> loaded went in one step: the parts run one after another (a step loads
    only once all of it is verified, so the old one serves until then)."""
    fetch, load = figures.fetch_s[0], figures.load_s[0]
    other = figures.publish_to_loaded_s - figures.publish_s - fetch - load
    return (
        f"  split of the best, s: publish (copy out + checksums) {figures.publish_s:.3f}, fetch + verify "
        f"{fetch:.3f}, load (copy into place) {load:.3f}, announce and reports {other:.3f}"
    )


def snapshot_lines(folders: list[Path]) -> list[str]:
    """Bytes on the wire for each step after the first, in full and as deltas against the one before."""
    from safetensors.numpy import load_file

    store = WeightStore(bucket_bytes=64 << 20, delta=True)
    lines = ["bytes on the wire per step between saved weights (delta against the step before):"]
    previous: tuple[int, str] | None = None
    for step, folder in enumerate(folders, start=1):
        tensors = load_file(str(folder / "model.safetensors" if folder.is_dir() else folder))
        announced = store.add(step, [(name, array, array.dtype.name) for name, array in tensors.items()])
        if previous is not None:
            sent = [store.bucket(step, index, base_step=step - 1) for index in range(announced.num_buckets)]
            delta = sum(array.nbytes for bucket in sent for array in bucket.tensors)
            full = announced.total_bytes
            lines.append(f"  {previous[1]} -> {folder.name}: {full / 1e6:9.2f} MB full, {delta / 1e6:9.2f} MB delta "
                         f"({delta / full:.3f} of full)")  # fmt: skip
        previous = (step, folder.name)
    return lines


def fanout_lines(model: list[NamedArray], args: argparse.Namespace) -> list[Line]:
    """Publish -> every replica loaded, all from the trainer and through a relay tree of ``args.fanout``,
    with the trainer's upload per step (median) in MB and in models."""
    mb = sum(array.nbytes for _, array, _ in model) / 1e6
    tree = f"relay tree: replica i pulls from replica (i - 1) // {args.fanout}" if args.fanout else "no relay tree"
    head = f"fan-out of {mb:.1f} MB, publish -> every replica loaded (best of {args.steps}); {tree}:"
    lines: list[Line] = [head]
    summary = []
    for count in args.replicas:
        for fanout, how in ((0, "from trainer"), (args.fanout, "relay tree")):
            if how == "relay tree" and (not fanout or count == 1):
                continue  # no tree asked for, or one replica: no peer to relay to
            figures = run_steps(model, args, count, fanout=fanout)
            seconds = min(f.publish_to_loaded_s for f in figures)
            upload = statistics.median(f.trainer_bytes for f in figures) / 1e6
            lines.append(rate(f"{count} replica(s) {how}, {seconds:.3f} s", mb * count / seconds,
                              f"MB/s delivered, trainer upload {upload:.1f} MB/step,"))  # fmt: skip
            if fanout:
                summary.append(f"fanout {count} replicas trainer upload {upload / mb:.2f} of {count} x model "
                               f"({seconds:.3f} s to all loaded)")  # fmt: skip
    return lines + summary


def formatted(lines: list[Line], raw: float) -> str:
    return "\n".join(line if isinstance(line, str) else f"{line[0]} / raw {line[1] / raw:6.3f}" for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and few steps: a smoke test")
    parser.add_argument("--big-gb", type=float, default=4.0, help="size of the synthetic big model (0: skip it)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration (after a first)")
    parser.add_argument("--bucket-mb", type=int, default=64, help="the trainer's weight_bucket_mb")
    parser.add_argument("--window", type=int, default=4, help="buckets a replica keeps in flight")
    parser.add_argument("--update-scale", type=float, default=1e-3, help="relative size of each step's update")
    parser.add_argument("--replicas", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--fanout", type=int, default=2, help="relay tree: peers each replica serves (>= 1)")
    parser.add_argument("--no-delta", dest="delta", action="store_false", help="skip the delta figures")
    parser.add_argument("--snapshots", type=Path, nargs="+", help="saved weights of a run, in step order")
    args = parser.parse_args()
    setup_logging("bench", None, level="warning")
    if args.snapshots:
        sys.stdout.write("\n".join(snapshot_lines(args.snapshots)) + "\n")
        return
    if args.quick:
        args.steps, args.bucket_mb, args.replicas = 1, 4, [1, 2]
    frames = 100 if args.quick else 300
    raws = [raw_loopback_mb_s(frames)]
    small = synthetic_model(24 << 20, 2 << 20) if args.quick else smollm2_model()
    lines: list[Line] = [f"bucket {args.bucket_mb} MiB, window {args.window}, update scale {args.update_scale:g}"]
    lines += model_lines("synthetic small" if args.quick else "SmolLM2-135M", small, args, args.delta)
    if args.big_gb > 0 and not args.quick:
        # Trainer copy, replica staging and loaded weights would each be another big model: left out.
        big = synthetic_model(int(args.big_gb * 1e9))
        raws.append(raw_loopback_mb_s(frames))
        lines += model_lines(f"synthetic {args.big_gb:g} GB", big, args, delta=False, gather_copy=False)
        del big
    raws.append(raw_loopback_mb_s(frames))
    lines += fanout_lines(small, args)
    raws.append(raw_loopback_mb_s(frames))
    # Loopback's rate swings by 2x from minute to minute on this shared machine: ratios are
    # against the best of every measurement, the figure least kind to the transfer.
    head = f"raw zmq loopback, 1 MiB frames: {', '.join(f'{r:.0f}' for r in raws)} MB/s; ratios against {max(raws):.0f}"
    sys.stdout.write(formatted([head, *lines], max(raws)) + "\n")


if __name__ == "__main__":
    main()
