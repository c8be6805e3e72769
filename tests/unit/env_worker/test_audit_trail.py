"""The env-worker's audit trail: each answer to a result it held, accepted or refused, with why."""

from __future__ import annotations

import asyncio

from rlbus.audit import ENV_VAR, read_audit
from rlbus.messages import ResultAck
from rlbus.services.env_worker.tokens import TurnRenderer
from tests.conftest import free_tcp_port

from .test_service import CountingEnvironment, FakeOrchestrator, make_worker, rollout_task, run_workers, worker_config


def answer(result) -> bool | ResultAck:
    if result.task_id == "t1":
        return ResultAck(task_ids=["t1"], accepted=False, reason="duplicate: this task already has a result")
    return True


def test_each_answer_to_a_held_result_is_recorded(scripted, renderer: TurnRenderer, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "audit"))
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    orchestrator = FakeOrchestrator(endpoint, [rollout_task(0), rollout_task(1)], ack=answer)
    worker = make_worker(worker_config(endpoint, "w0"), CountingEnvironment(2), scripted(lambda p, s: "ok"), renderer)
    try:
        asyncio.run(run_workers([worker], orchestrator.serve_until(
            lambda: len(orchestrator.results) == 2 and not worker.unacked)))  # fmt: skip
    finally:
        orchestrator.close()
    records = sorted(read_audit(tmp_path / "audit" / "env-worker-w0.jsonl"), key=lambda r: r["task_id"])
    assert [(r["task_id"], r["worker_id"], r["accepted"], r["is_eval"]) for r in records] == [
        ("t0", "w0", True, False), ("t1", "w0", False, False)]  # fmt: skip
    assert records[1]["reason"].startswith("duplicate")
