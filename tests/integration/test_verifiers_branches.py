"""A verifiers 0.4 harness that holds two conversations in one episode, trained by ``rlbus rl``: each
rollout's two token branches become two samples of the step (real vLLM, trainer, orchestrator)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomli_w

from rlbus.jsonl import read_json_objects as read_jsonl
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.conftest import free_tcp_port
from tests.integration.small_run import loopback_endpoints
from tests.unit.env_worker.test_verifiers_v1 import TASKSETS

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 2
ENV_ID = "verifiers:tiny-v1-twice"


def test_two_conversations_of_one_episode_train_as_two_samples(tmp_path):
    pytest.importorskip("verifiers.v1", reason="needs verifiers 0.4: pip install -e '.[verifiers]'")
    tasksets = tmp_path / "tasksets"
    tasksets.mkdir()
    for name, source in TASKSETS.items():
        (tasksets / name).write_text(textwrap.dedent(source))
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    config = {
        "model": str(model), "output_dir": str(tmp_path / "run"), "max_steps": MAX_STEPS, "num_env_workers": 1,
        "inference": {"port": free_tcp_port(), "max_model_len": 512},
        "trainer": {"optimizer": {"lr": 1e-5}},
        "orchestrator": {
            "batch_size": 8, "rollouts_per_example": 4, "seq_len": 512, "max_async_level": 0,
            "sampling": {"max_tokens": 48}, "advantage": {"length_penalty": 0.5},
            "train": {"env": [{"id": ENV_ID, "args": {"player.harness.id": "null"}}]},
        },
    }  # fmt: skip
    path = tmp_path / "rl.toml"
    path.write_text(f"{tomli_w.dumps(config)}\n[bus.endpoints]\n{loopback_endpoints()}\n")
    # Every service imports the tasksets; the harness syncs its program with uv from the venv's bin.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    env |= {"PYTHONPATH": str(tasksets), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "rlbus", "rl", "@", str(path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1500, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_jsonl(tmp_path / "run" / "steps.jsonl")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1)), rows
    for row in rows:
        assert row["orchestrator/errored_rollouts"] == 0, row
        # 8 rollouts a step (2 examples x 4), each of two conversations: two samples per rollout of the
        # groups with a signal (the length penalty tells a group's rollouts apart).
        trained_groups = 2 - row["orchestrator/dropped/zero_advantage_groups"]
        assert trained_groups > 0, row
        assert row["orchestrator/num_turns/min"] == 2, row
        assert row["orchestrator/batch/num_samples"] == 2 * 4 * trained_groups, row
        assert "trainer/loss/mean" in row and row["trainer/mismatch_kl/mean"] < 1e-3, row
