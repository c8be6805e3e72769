"""An admitted peer sends the orchestrator well-formed messages with hostile values, over tcp with Curve.

Curve keeps strangers out; it says nothing about what an admitted peer (a buggy
env-worker, a compromised host) sends. Here such a peer, holding the run's
client key, takes real tasks and answers each with a result spoiled in one way
(tests/integration/hostile_messages.py: NaN/inf/1e39 numbers, token ids past
int32, policy steps from the future, wrong rollout counts, bodies around
``max_header_bytes``), sends duplicates, results for tasks it does not hold, and
requests with impossible values. Then a good worker and trainer run the job.

The property: every spoiled result is answered with ``ResultAck(accepted=False)``,
every impossible request is refused (``Refused``) or counted as bad; the run
finishes with every step trained exactly once; no batch holds a non-finite
number or a token outside the vocabulary, nor anything the trainer's own checks
would drop; and the orchestrator restarts from its journal afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings

from rlbus.bus import Bus, BusTimeout
from rlbus.messages import BatchAck, BatchRequest, Refused, ResultAck, RolloutTask, TaskRequest, TrainBatch
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.orchestrator.service import OrchestratorService
from rlbus.services.trainer.batch import check_batch
from tests.curve_keys import make_key_sets
from tests.unit.orchestrator.fakes import roll_out, stub_loader

from .fuzz_frames import wait_for_count
from .hostile_messages import Spoiled, hostile_requests, hostile_results
from .orchestrator_peers import OrchestratorThread, run_good_peers, tcp_bus_config

pytestmark = pytest.mark.slow
NUM_EXAMPLES = int(os.environ.get("RLBUS_FUZZ_EXAMPLES", "2000")) // 10
TIMEOUT_S = 20.0
SIZES = {"a": 20}
MAX_STEPS = 3
VOCAB = 2048  # the fake workers' token ids stay far below it
# Small limits, so that "up to the limit" is cheap to send.
LIMITS = {"max_frames": 16, "max_header_bytes": 32 * 1024, "max_frame_bytes": 64 * 1024,
          "max_payload_bytes": 256 * 1024}  # fmt: skip


class HostilePeer:
    """One DEALER per orchestrator socket on an admitted bus; records every answer it gets."""

    def __init__(self, bus: Bus, config: OrchestratorConfig) -> None:
        endpoints = config.bus.endpoints
        self.bus = bus
        self.tasks = bus.connect(zmq.DEALER, endpoints.orchestrator_tasks, "tasks")
        self.batches = bus.connect(zmq.DEALER, endpoints.orchestrator_batches, "batches")
        self.accepted: list[str] = []
        """Spoiled results the orchestrator accepted: each names the field and value."""
        self.num_refused = 0

    def take_task(self) -> RolloutTask:
        self.bus.send(self.tasks, TaskRequest(worker_id="hostile", num_tasks=1))
        return self.bus.recv(self.tasks, TIMEOUT_S, RolloutTask)

    def answer(self, result, what: str) -> ResultAck:
        self.bus.send(self.tasks, result)
        ack = self.bus.recv(self.tasks, TIMEOUT_S, ResultAck)
        assert ack.task_ids == [result.task_id], (what, ack)
        if ack.accepted:
            self.accepted.append(f"{what} (task {result.task_id})")
        else:
            self.num_refused += 1
        return ack

    def send_spoiled(self, spoiled: Spoiled) -> None:
        try:
            task = self.take_task()
        except BusTimeout:
            # Accepted spoiled groups fill the steps until the policy gate closes: no more tasks.
            raise AssertionError(f"no task offered; spoiled results accepted so far: {self.accepted}") from None
        self.answer(spoiled.result_for(task), spoiled.what)

    def send_duplicate_and_colliding(self, spoiled: Spoiled) -> None:
        """A good result sent twice; spoiled ones for task ids next to ours (an earlier task of
        this run, which we do not hold, and one not issued yet: that id is then skipped)."""
        task = self.take_task()
        assert self.answer(roll_out(task, 0, worker_id="hostile"), "a good result").accepted
        self.accepted.pop()  # that one was meant to be accepted
        duplicate = self.answer(roll_out(task, 0, worker_id="hostile"), "the same result again")
        assert "duplicate" in duplicate.reason
        run_id, number = task.task_id.rsplit("-", 1)
        mine = self.take_task()
        colliding = spoiled.result_for(mine)
        colliding.task_id = f"{run_id}-{int(number) - 1}"
        self.answer(colliding, f"{spoiled.what}, for another task's id")
        colliding.task_id = f"{run_id}-{int(number) + 3}"
        self.answer(colliding, f"{spoiled.what}, for a task id not issued yet")
        self.answer(spoiled.result_for(mine), spoiled.what)  # and ours, so its lease does not run out

    def send_requests(self, requests: list) -> int:
        """Send each impossible request; returns how many were not answered (to be counted as bad)."""
        num_unanswered = 0
        for request in requests:
            sock = self.batches if isinstance(request, BatchRequest | BatchAck) else self.tasks
            self.bus.send(sock, request)
            if isinstance(request, BatchRequest):
                reply = self.bus.recv(sock, TIMEOUT_S, (Refused, TrainBatch))
                assert isinstance(reply, Refused), (request, reply)
            else:
                num_unanswered += 1
        return num_unanswered


class BatchInspector:
    """Collects, for each batch the trainer receives, whatever hostile made it into it."""

    def __init__(self, max_positions: int) -> None:
        self.max_positions = max_positions
        self.problems: list[str] = []

    def __call__(self, batch: TrainBatch) -> None:
        for i, micro in enumerate(batch.micro_batches):
            ids = np.asarray(micro.input_ids)
            for name in ("advantages", "inference_logprobs", "temperatures"):
                if not np.isfinite(np.asarray(getattr(micro, name))).all():
                    self.problems.append(f"step {batch.step} micro-batch {i}: non-finite {name}")
            if ids.size and not (0 <= ids.min() and ids.max() < VOCAB):
                self.problems.append(f"step {batch.step} micro-batch {i}: token ids {ids.min()}..{ids.max()}")
        try:
            checked = check_batch(batch, 0, 1, VOCAB, self.max_positions)  # the trainer's own checks
        except ValueError as exc:
            self.problems.append(f"step {batch.step}: the trainer would refuse it: {exc}")
            return
        if checked.num_dropped_samples:
            self.problems.append(f"step {batch.step}: the trainer would drop samples: {checked.reasons}")


def make_config(tmp_path: Path) -> OrchestratorConfig:
    keys = make_key_sets(tmp_path / "keys")
    bus = tcp_bus_config(keys["good"], **LIMITS)
    return OrchestratorConfig(batch_size=4, rollouts_per_example=2, seq_len=64, max_steps=MAX_STEPS,
                              output_dir=tmp_path / "run", task_lease_s=30, bus=bus,
                              train={"env": [{"id": "a"}]})  # fmt: skip


def fuzz_results(peer: HostilePeer, config: OrchestratorConfig) -> int:
    """Send ``NUM_EXAMPLES`` spoiled results (hypothesis, derandomized); returns how many."""
    sent: list[str] = []
    strategy = hostile_results(config.rollouts_per_example, config.bus.max_header_bytes, config.bus.max_frame_bytes)

    # No shrinking: each example changes the live orchestrator, so a replay is not the same case.
    @settings(max_examples=NUM_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(strategy)
    def send_one(spoiled: Spoiled) -> None:
        peer.send_spoiled(spoiled)
        sent.append(spoiled.what)

    send_one()
    return len(sent)


def test_hostile_values_from_an_admitted_peer_are_refused_and_never_trained(tmp_path):
    config = make_config(tmp_path)
    orchestrator = OrchestratorThread(config, SIZES)
    orchestrator.start()
    with Bus(config.bus) as bus:  # the run's own client key: Curve admits it
        peer = HostilePeer(bus, config)
        num_spoiled = fuzz_results(peer, config)
        colliding = Spoiled("rollouts[0].reward = nan", lambda r: setattr(r.rollouts[0], "reward", float("nan")))
        peer.send_duplicate_and_colliding(colliding)
        requests = hostile_requests(MAX_STEPS, config.trainer_world_size)
        num_unanswered = peer.send_requests(requests)
        wait_for_count(lambda: sum(orchestrator.service.num_bad_requests.values()), num_unanswered, "bad requests")
        assert orchestrator.is_alive(), orchestrator.error

        inspector = BatchInspector(config.seq_len)
        trainer = run_good_peers(config, orchestrator, MAX_STEPS, TIMEOUT_S, on_batch=inspector)
    assert peer.accepted == [], f"spoiled results accepted: {peer.accepted}"
    assert peer.num_refused == num_spoiled + 4 and num_spoiled >= NUM_EXAMPLES // 2
    assert trainer.acked == list(range(1, MAX_STEPS + 1)) and trainer.refused == []
    assert inspector.problems == []
    metrics = orchestrator.service.bus.stats
    assert metrics.decode_errors["tasks"] > 0, "no body over max_header_bytes was drawn"

    # The journal holds only what was accepted: a restart replays it.
    resumed = config.model_copy(update={"ckpt": config.ckpt.model_copy(update={"resume_step": -1})})
    service = OrchestratorService(resumed, stub_loader(SIZES))
    service.journal.close()
    service.bus.close()
