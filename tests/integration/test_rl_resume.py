"""`rlbus rl --ckpt.resume-step N` resumes every service from step N; metrics continue from N + 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.integration.chaos_run import write_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]


def rl(config: Path, *args: str) -> None:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    result = subprocess.run([sys.executable, "-m", "rlbus", "rl", "@", str(config), *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


def steps_of(metrics: list[dict], service: str, key: str) -> list[int]:
    return [m["step"] for m in metrics if m["service"] == service and key in m]


def test_rl_resumes_the_whole_run_from_a_checkpoint_step(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    config = write_config(tmp_path, model, max_steps=3, num_env_workers=1)
    run = tmp_path / "run"
    rl(config, "--ckpt.save-async")  # the checkpoints resumed from below are written off the training thread
    first = (run / "metrics.jsonl").read_text().splitlines()
    assert "saved checkpoint of step 2 in" in (run / "logs" / "trainer.log").read_text()
    assert "(in the background)" in (run / "logs" / "trainer.log").read_text()

    rl(config, "--max-steps", "4", "--ckpt.resume-step", "2")

    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[len(first):]]
    assert steps_of(resumed, "trainer", "loss/mean") == [3, 4]
    assert steps_of(resumed, "orchestrator", "reward/all/mean") == [3, 4]
    trainer_log = (run / "logs" / "trainer.log").read_text()
    assert f"resumed from checkpoint {run / 'checkpoints' / 'step_2'} (step 2)" in trainer_log
    orchestrator_log = (run / "logs" / "orchestrator.log").read_text()
    assert "resuming at step 2" in orchestrator_log
    # Resuming from an older step than the journal's end starts a new journal.
    assert list((run / "checkpoints" / "orchestrator").glob("journal.jsonl.*.discarded"))
