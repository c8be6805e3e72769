"""Chaos: kill -9 services of a real run (vLLM on CPU, tiny model) and restart each with its own
command, at async levels 1 and 0; the run finishes with every step trained exactly once and no
acknowledged result lost, as the env-workers' and the trainer's audit trails tell it (see
tests.integration.chaos_audit: not the orchestrator's journal, which is under test).

- async 1: timed kills of the trainer (restarted armed: it then dies at a fault point between
  writing a checkpoint and renaming it), the inference replica, an env-worker (and one more
  worker joins) and the orchestrator;
- async 0: kills at fault points only the code can place: the trainer after its checkpoint and
  before its BatchAck; the orchestrator after saving progress and before compacting its journal,
  then (restarted) after journaling a result and before its ResultAck; then a timed inference kill.
"""

from __future__ import annotations

import os

import pytest

from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.integration.chaos_run import ChaosRun, accepted_by, audit, write_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MAX_STEPS = 30
"""Room after the last kill: steps built from results already buffered can take under 0.5 s each
on a loaded machine (once, with 13 steps, steps 8..13 took 3 s and the orchestrator's kill at
step 8 landed after the run's end; with 17, a slow env-worker restart let the run reach step 17
before that kill), and a restarted env-worker needs a few seconds before its first result is accepted."""
TIMED_KILLS = {
    1: {"trainer": 2, "inference": 4, "env-worker-0": 6, "orchestrator": 8},
    0: {"inference": 7},
}
"""Async level -> service -> trainer step at which it is killed from outside."""
ARMED_AT_START = {
    0: {"trainer": ["trainer.before_batch_ack:2"],
        "orchestrator": ["orchestrator.before_compaction:3", "orchestrator.before_result_ack:4"]},
}  # fmt: skip
"""Async level -> service -> fault points of its first starts (``rlbus.faults``), one list item a start."""
ARMED_ON_RESTART = {1: {"trainer": "trainer.checkpoint_before_rename:2"}}
"""Async level -> service -> fault points of its start after its timed kill."""


@pytest.mark.parametrize("async_level", [1, 0])
def test_kills_at_any_time_and_inside_write_rename_ack_windows_lose_nothing(tmp_path, monkeypatch, async_level):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    run = ChaosRun(write_config(tmp_path, model, MAX_STEPS, max_async_level=async_level), timeout_s=420)
    for name, specs in ARMED_AT_START.get(async_level, {}).items():
        run.arm(name, *specs)
    try:
        run.start_all()
        for name, step in TIMED_KILLS[async_level].items():
            run.wait_for_step(step)
            if name.startswith("env-worker"):
                run.join_env_worker("env-worker-2")  # hot join: one more worker, started mid-run
            if name in ARMED_ON_RESTART.get(async_level, {}):
                run.arm(name, ARMED_ON_RESTART[async_level][name])
            run.kill_and_restart(name)
        run.wait_for_end()
    finally:
        run.stop_all()
    result = audit(run)
    assert result.contiguous, result.trained_steps
    assert not result.duplicate_steps and not result.skipped_steps, result
    assert not result.trained_twice, result.trained_twice
    assert result.num_acked > 0 and not result.lost, result.lost
    expected = [(name, "timed") for name in TIMED_KILLS[async_level]]
    expected += [(name, spec) for name, spec in ARMED_ON_RESTART.get(async_level, {}).items()]
    expected += [(name, spec) for name, specs in ARMED_AT_START.get(async_level, {}).items() for spec in specs]
    assert sorted((r.name, r.how) for r in run.recoveries) == sorted(expected)
    assert all(r.recovery_s > 0 for r in run.recoveries), run.recoveries
    if "env-worker-0" in TIMED_KILLS[async_level]:
        assert accepted_by(run, "env-worker-2") > 0  # the worker that joined mid-run was given tasks
