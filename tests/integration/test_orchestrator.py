"""The orchestrator on real sockets, its peers replaced by small fakes (tests/integration/orchestrator_peers.py):
bounded staleness under random delays, a killed env-worker, a restarted trainer, the CLI without torch."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import tomli_w
import zmq

from rlbus.bus import Bus
from rlbus.codec import encode
from rlbus.messages import ResultAck, RolloutTask, TaskRequest, TrainBatch
from rlbus.services.orchestrator.config import OrchestratorConfig
from tests.unit.orchestrator.fakes import roll_out, trained_policy_steps

from .orchestrator_peers import (
    TIMEOUT_S,
    FakeTrainer,
    FakeWorker,
    MonitorSink,
    OrchestratorThread,
    PolicyClock,
    ipc_bus_config,
    remove_folder,
    short_folder,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[2]
SIZES = {"a": 40, "b": 25}


@pytest.fixture
def folder() -> Iterator[Path]:
    path = short_folder()
    yield path
    remove_folder(path)


def make_config(folder: Path, tmp_path: Path, **overrides) -> OrchestratorConfig:
    values = dict(
        batch_size=8, rollouts_per_example=2, seq_len=64, max_steps=6, output_dir=tmp_path, task_lease_s=30,
        bus=ipc_bus_config(folder), train={"env": [{"id": "a", "ratio": 2.0}, {"id": "b", "ratio": 1.0}]},
    )  # fmt: skip
    return OrchestratorConfig(**(values | overrides))


def finish_all(orchestrator: OrchestratorThread, *peers) -> None:
    """Wait for the orchestrator, stop the workers, and surface any peer's failure."""
    try:
        assert orchestrator.finish() == 0
    finally:
        for peer in peers:
            if isinstance(peer, FakeWorker):
                peer.stop_event.set()
            peer.join(TIMEOUT_S)
    for peer in peers:
        if peer.error is not None:
            raise peer.error


def test_no_batch_trains_on_a_rollout_older_than_the_bound(folder, tmp_path):
    bound = 0
    config = make_config(folder, tmp_path, max_async_level=2, max_off_policy_steps=bound, seed=3)
    with Bus(config.bus) as bus:
        monitor = MonitorSink(bus, config.bus.endpoints.monitor_telemetry)
        orchestrator, policy = OrchestratorThread(config, SIZES), PolicyClock()
        trained: list[TrainBatch] = []
        workers = [FakeWorker(config.bus, policy, seed=i, max_delay_s=d, name=f"worker-{i}")
                   for i, d in enumerate([0.02, 0.2, 0.6])]  # fmt: skip
        trainer = FakeTrainer(config.bus, policy, 1, 6, seed=1, max_train_s=0.1, on_batch=trained.append)
        for peer in (orchestrator, *workers, trainer):
            peer.start()
        finish_all(orchestrator, trainer, *workers)
        reports = monitor.metrics()
    assert trainer.acked == list(range(1, 7))
    for batch in trained:  # batch N is on-policy when sampled by policy N - 1
        lags = [batch.step - 1 - p for p in trained_policy_steps(batch)]
        assert lags and max(lags) <= bound, (batch.step, max(lags))
    step_reports = [r.metrics for r in reports if "off_policy/max" in r.metrics]
    assert len(step_reports) == 6 and all(m["off_policy/max"] <= bound for m in step_reports)
    # Tasks issued ahead (async level 2) are sampled by an older policy: the bound was really tested.
    num_stale = sum(m["dropped/stale_groups"] for m in step_reports)
    num_stale += sum("stale" in reason for w in workers for reason in w.refusals)
    assert num_stale > 0


def hoard_tasks(address: str, received: multiprocessing.Queue) -> None:
    """An env-worker that takes four tasks and never answers (until it is killed)."""
    from rlbus.config.base import BusConfig

    with Bus(BusConfig(linger_ms=0)) as bus:
        sock = bus.connect(zmq.DEALER, address, role="tasks")
        bus.send(sock, TaskRequest(worker_id="hoarder", num_tasks=4))
        while True:
            received.put(bus.recv(sock, TIMEOUT_S, RolloutTask, what="tasks").task_id)


@pytest.mark.slow
def test_a_killed_env_workers_tasks_are_issued_again_and_all_complete(folder, tmp_path):
    config = make_config(folder, tmp_path, max_steps=3, task_lease_s=2.0)
    orchestrator, policy = OrchestratorThread(config, SIZES), PolicyClock()
    orchestrator.start()
    context = multiprocessing.get_context("spawn")
    received = context.Queue()
    hoarder = context.Process(target=hoard_tasks, args=(config.bus.endpoints.orchestrator_tasks, received),
                              daemon=True)  # fmt: skip
    hoarder.start()
    try:
        hoarded = [received.get(timeout=TIMEOUT_S) for _ in range(4)]
    finally:
        os.kill(hoarder.pid, signal.SIGKILL)
        hoarder.join(TIMEOUT_S)
    assert hoarder.exitcode == -signal.SIGKILL
    worker = FakeWorker(config.bus, policy, seed=0, max_delay_s=0.05)
    trainer = FakeTrainer(config.bus, policy, 1, 3)
    worker.start()
    trainer.start()
    finish_all(orchestrator, trainer, worker)
    assert trainer.acked == [1, 2, 3]
    # The dead worker's tasks came back under the same ids and were finished by the live one.
    assert set(hoarded) <= set(worker.answered)


def batch_bytes(batch: TrainBatch) -> list[bytes]:
    return [array.tobytes() for mb in batch.micro_batches
            for array in (mb.input_ids, mb.position_ids, mb.loss_mask, mb.advantages)]  # fmt: skip


def test_exactly_once_batch_delivery_across_a_trainer_restart(folder, tmp_path):
    config = make_config(folder, tmp_path, max_steps=5)
    orchestrator, policy = OrchestratorThread(config, SIZES), PolicyClock()
    worker = FakeWorker(config.bus, policy, seed=0, max_delay_s=0.05)
    received: list[tuple[str, int, list[bytes]]] = []
    first = FakeTrainer(config.bus, policy, 1, 5, die_before_ack=3, name="trainer-1",
                        on_batch=lambda b: received.append(("trainer-1", b.step, batch_bytes(b))))  # fmt: skip
    for peer in (orchestrator, worker, first):
        peer.start()
    first.join(TIMEOUT_S)
    assert first.error is None and first.acked == [1, 2]
    # The restarted trainer (new sockets, new identity) starts again from step 1 (no checkpoint): the
    # orchestrator kept the acknowledged batches (no progress checkpoint since), so it repeats steps 1
    # and 2 with the very same batches instead of skipping them.
    second = FakeTrainer(config.bus, policy, 1, 5, name="trainer-2",
                         on_batch=lambda b: received.append(("trainer-2", b.step, batch_bytes(b))))  # fmt: skip
    second.start()
    finish_all(orchestrator, second, worker)
    assert second.refused == []
    assert second.acked == [1, 2, 3, 4, 5], "the restarted trainer trains every step after its checkpoint"
    for step in (1, 2, 3):
        batches = [data for _, s, data in received if s == step]
        assert len(batches) == 2 and batches[0] == batches[1], f"step {step} is delivered again unchanged"


@pytest.mark.slow
def test_rlbus_orchestrator_runs_without_torch_and_writes_progress(folder, tmp_path):
    bus_config = ipc_bus_config(folder)
    config = {
        "output_dir": str(tmp_path), "max_steps": 2, "batch_size": 4, "rollouts_per_example": 2, "seq_len": 256,
        "bus": bus_config.model_dump(mode="json", exclude_none=True), "ckpt": {"interval": 1},
        "train": {"env": [{"id": "reverse-text"}]},
        "eval": {"interval": 1, "env": [{"id": "reverse-text", "num_examples": 3, "rollouts_per_example": 2}]},
    }  # fmt: skip
    path = tmp_path / "orchestrator.toml"
    path.write_text(tomli_w.dumps(config))
    # torch, vllm and transformers cannot be imported in this process: the orchestrator must not need them.
    code = ("import sys; sys.modules.update(torch=None, vllm=None, transformers=None); "
            "from rlbus.services.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    process = subprocess.Popen([sys.executable, "-c", code, "orchestrator", "@", str(path)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    policy = PolicyClock()
    worker = FakeWorker(bus_config, policy, seed=0, max_delay_s=0.05)
    trainer = FakeTrainer(bus_config, policy, 1, 2, load_last_policy=True)
    with Bus(bus_config) as bus:
        monitor = MonitorSink(bus, bus_config.endpoints.monitor_telemetry)
        worker.start()
        trainer.start()
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        finally:
            process.kill()
            worker.stop_event.set()
            worker.join(TIMEOUT_S)
            trainer.join(TIMEOUT_S)
        reports = monitor.metrics()
    assert process.returncode == 0, output
    assert trainer.error is None and trainer.acked == [1, 2]
    progress = sorted(p.name for p in (tmp_path / "checkpoints" / "orchestrator").iterdir())
    assert [name for name in progress if ".upto_" not in name] == ["journal.jsonl", "step_1.json", "step_2.json"]
    assert len([name for name in progress if name.startswith("journal.upto_")]) == 2  # compacted at each checkpoint
    assert (tmp_path / "logs" / "orchestrator.log").exists()
    eval_reports = [r for r in reports if "eval/reverse-text/avg@2" in r.metrics]
    # Every policy step inference reported is evaluated (interval 1; the stand-in reports from policy 1
    # on), the last one (2) before the orchestrator finishes.
    assert sorted(r.step for r in eval_reports) == [1, 2], [sorted(r.metrics) for r in reports]
    assert eval_reports[0].metrics["eval/reverse-text/pass@2"] == pytest.approx(1.0)  # fake rewards 0, 1


@pytest.mark.slow
def test_rlbus_orchestrator_stops_cleanly_on_sigterm(folder, tmp_path):
    bus_config = ipc_bus_config(folder)
    config = {"output_dir": str(tmp_path), "bus": bus_config.model_dump(mode="json", exclude_none=True),
              "train": {"env": [{"id": "reverse-text"}]}}  # fmt: skip
    path = tmp_path / "orchestrator.toml"
    path.write_text(tomli_w.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    with Bus(bus_config) as bus:
        monitor = MonitorSink(bus, bus_config.endpoints.monitor_telemetry)
        process = subprocess.Popen([sys.executable, "-m", "rlbus", "orchestrator", "@", str(path)], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            monitor.wait_event("started")
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=TIMEOUT_S)
        finally:
            process.kill()
    assert process.returncode == 0, output
    assert "stopping at step 1 as requested" in output


def unreadable_result(task: RolloutTask) -> list[bytes]:
    """Frames of a result for ``task`` that name it but do not decode (a string where an int belongs)."""
    frames = encode(roll_out(task, 0, worker_id="poisoner"))
    body = msgspec.msgpack.decode(bytes(frames[1]))
    body["example_id"] = "not a number"
    return [bytes(frames[0]), msgspec.msgpack.encode(body), *map(bytes, frames[2:])]


def test_an_unreadable_result_is_refused_by_task_id_and_the_run_still_finishes(folder, tmp_path):
    config = make_config(folder, tmp_path, max_steps=2, max_task_issues=2)
    orchestrator, policy = OrchestratorThread(config, SIZES), PolicyClock()
    orchestrator.start()
    refusals: dict[str, str] = {}
    with Bus(config.bus) as bus:
        sock = bus.connect(zmq.DEALER, config.bus.endpoints.orchestrator_tasks, role="tasks")
        bus.send(sock, TaskRequest(worker_id="poisoner", num_tasks=3))
        tasks = [bus.recv(sock, TIMEOUT_S, RolloutTask, what="task") for _ in range(3)]
        for task in tasks:
            sock.send_multipart(unreadable_result(task))
            ack = bus.recv(sock, TIMEOUT_S, ResultAck, what=f"refusal of the unreadable result of {task.task_id}")
            assert ack.task_ids == [task.task_id] and not ack.accepted
            refusals[task.task_id] = ack.reason
        worker, trainer = FakeWorker(config.bus, policy, seed=0, max_delay_s=0.05), FakeTrainer(config.bus, policy, 1, 2)
        worker.start()
        trainer.start()
        finish_all(orchestrator, trainer, worker)
    assert len(refusals) == 3 and all("unreadable: RolloutResult: invalid body" in r for r in refusals.values())
    assert trainer.acked == [1, 2]
