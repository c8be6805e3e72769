"""Chaos: kill -9 the trainer, the inference replica and an env-worker of a real run (vLLM on CPU),
one after the other, each restarted with its own command, and one more env-worker joins mid-run;
the run finishes with every step trained exactly once and no accepted rollout lost (see
tests.integration.chaos_run for how that is read)."""

from __future__ import annotations

import os

import pytest

from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.integration.chaos_run import ChaosRun, accepted_by, audit, write_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

KILLS = {"trainer": 2, "inference": 4, "env-worker-0": 6}
"""Service -> trainer step at which it is killed."""
MAX_STEPS = 13
"""Room after the last kill: steps built from results already buffered can take under 3 s each,
and a restarted env-worker needs a few seconds before its first result is accepted (with 9 steps
the run once ended 6 s after the env-worker's restart, before it was back)."""


def test_kill_trainer_inference_and_env_worker_mid_run_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    run = ChaosRun(write_config(tmp_path, model, MAX_STEPS), timeout_s=420)
    try:
        run.start_all()
        for name, step in KILLS.items():
            run.wait_for_step(step)
            if name.startswith("env-worker"):
                run.join_env_worker("env-worker-2")  # hot join: one more worker, started mid-run
            run.kill_and_restart(name)
        run.wait_for_end()
    finally:
        run.stop_all()
    result = audit(run)
    assert result.contiguous, result.trained_steps
    assert not result.duplicate_steps and not result.skipped_steps, result
    assert not result.groups_in_two_steps, result.groups_in_two_steps
    assert result.num_accepted > 0 and not result.lost_rollouts, result.lost_rollouts
    assert [r.name for r in run.recoveries] == list(KILLS)
    assert all(r.recovery_s > 0 for r in run.recoveries), run.recoveries
    assert accepted_by(run, "env-worker-2") > 0  # the worker that joined mid-run was given tasks
