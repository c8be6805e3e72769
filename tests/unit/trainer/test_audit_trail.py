"""The trainer's audit trail: each applied step is recorded, with its groups' task ids, after its
checkpoint and before its BatchAck (a kill in between leaves the step recorded exactly once)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from rlbus import faults
from rlbus.audit import AuditLog, read_audit
from rlbus.services.trainer.service import RlLoop

from .batches import train_batch

METRICS = {"loss/mean": 0.1, "entropy/mean": 1.0, "optim/lr": 1e-5, "optim/grad_norm": 1.0, "perf/throughput": 1.0,
           "perf/mfu": 0.0}  # fmt: skip


class Killed(Exception):
    """Stands in for the SIGKILL of a fault point."""


class Batches:
    def __init__(self, audit: AuditLog) -> None:
        self.audit, self.num_duplicates = audit, 0
        self.acks: list[tuple[int, bool, list[dict]]] = []

    def fetch(self, step: int):
        batch = train_batch(step)
        batch.task_ids = [f"task-{step}-a", f"task-{step}-b"]
        return batch

    def ack(self, step: int, ok: bool = True, reason: str = "") -> None:
        self.acks.append((step, ok, read_audit(self.audit.path) if self.audit.path.exists() else []))


def fake_loop(tmp_path, events: list[str]) -> RlLoop:
    loop = RlLoop.__new__(RlLoop)
    loop.config = SimpleNamespace(trainer_id="t0", ckpt=SimpleNamespace(save_async=False))
    loop.rt = SimpleNamespace(ctx=SimpleNamespace(is_main=True), model=None,
                              trainer=SimpleNamespace(run=lambda step, rows, n, sft=False: dict(METRICS)))  # fmt: skip
    loop.audit = AuditLog(tmp_path / "audit" / "trainer-t0.jsonl")
    loop.batches = Batches(loop.audit)
    loop.weights = SimpleNamespace(publish=lambda step, model: 0.0, published_bytes=0, adapter=lambda model: None)
    loop.pulse = SimpleNamespace(busy=lambda step: contextlib.nullcontext())
    loop.telemetry = SimpleNamespace(heartbeat=lambda *a: None, metrics=lambda *a: None, event=lambda *a, **k: None)
    loop.num_rejected = loop.num_dropped_samples = 0
    loop.lora_sizes = {}
    loop.prepare = lambda batch: []
    loop.checkpoint = lambda step: events.append(f"checkpoint {step}") or 0.0
    return loop


def test_a_step_is_recorded_with_its_task_ids_after_the_checkpoint_and_before_the_ack(tmp_path):
    events: list[str] = []
    loop = fake_loop(tmp_path, events)
    loop.train_one(1)
    loop.train_one(2)
    assert events == ["checkpoint 1", "checkpoint 2"]
    (step, ok, seen_at_ack), _ = loop.batches.acks
    assert step == 1 and ok and [r["step"] for r in seen_at_ack] == [1]
    records = read_audit(loop.audit.path)
    assert [(r["step"], r["ok"], r["task_ids"]) for r in records] == [
        (1, True, ["task-1-a", "task-1-b"]), (2, True, ["task-2-a", "task-2-b"])]  # fmt: skip


def test_a_kill_at_the_fault_point_leaves_the_step_recorded_and_unacknowledged(tmp_path, monkeypatch):
    def kill(pid, sig):
        raise Killed

    monkeypatch.setattr(faults.os, "kill", kill)
    loop = fake_loop(tmp_path, [])
    faults.arm("trainer.before_batch_ack:2")
    try:
        loop.train_one(1)
        with pytest.raises(Killed):
            loop.train_one(2)
    finally:
        faults.arm("")
    assert [step for step, _, _ in loop.batches.acks] == [1]
    assert [r["step"] for r in read_audit(loop.audit.path)] == [1, 2]
