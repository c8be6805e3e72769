"""``rlbus rl`` with ``trainer.weight_transport = "collective"`` (gloo on CPUs): the launcher puts the
replica it starts into the trainer's weight group, the replica joins it as it starts, and the
trainer's steps reach vLLM by broadcast, not over the bus, with the same weights the bus would give.

Where each step came from is read from the replica's ``inference/weight_broadcast_mb`` and
``inference/weight_trainer_mb`` metrics; that the broadcast weights are the trainer's, from
``mismatch_kl`` (the trainer's logprobs against the ones vLLM sampled with), as in the bus run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlbus.jsonl import read_json_objects as read_jsonl
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.run_config.placement import FAKE_GPU_COUNT_VARIABLE
from tests.conftest import free_tcp_port
from tests.integration.small_run import TRAINING_TOML, loopback_endpoints

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 4


def run_config(tmp_path: Path, model: Path, replicas: int) -> Path:
    path = tmp_path / "rl.toml"
    # Several replicas run on pretend GPUs (CPU vLLM ignores them). The group's timeout covers a
    # replica that is still starting when the trainer first forms it.
    placement = f"inference_gpu_ids = {list(range(replicas))}" if replicas > 1 else ""
    path.write_text(f"""
model = "{model}"
output_dir = "{tmp_path / "run"}"
max_steps = {MAX_STEPS}
num_env_workers = 1
{placement}

[bus.endpoints]
{loopback_endpoints()}

[inference]
port = {free_tcp_port()}
max_model_len = 512

[trainer]
weight_transport = "collective"
weight_group_address = "127.0.0.1:{free_tcp_port()}"
weight_group_backend = "gloo"
weight_group_timeout_s = 300

{TRAINING_TOML}
""")
    return path


@pytest.mark.parametrize("replicas", [1, 2])
def test_rl_run_loads_the_trainers_steps_by_broadcast(tmp_path, replicas):
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    env = os.environ | {FAKE_GPU_COUNT_VARIABLE: str(replicas),
                        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "rlbus", "rl", "@", str(run_config(tmp_path, model, replicas))],
                            check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    run = tmp_path / "run"
    assert result.returncode == 0, result.stderr[-4000:]

    metrics = read_jsonl(run / "metrics.jsonl")
    trainer = [m for m in metrics if m["service"] == "trainer" and "loss/mean" in m]
    assert sorted(m["step"] for m in trainer) == list(range(1, MAX_STEPS + 1))
    assert [row["step"] for row in read_jsonl(run / "steps.jsonl")] == list(range(1, MAX_STEPS + 1))
    full_mb = {m["weights/published_bytes"] / 1e6 for m in trainer}
    assert len(full_mb) == 1, full_mb

    updates = [m for m in metrics if m["service"] == "inference" and "inference/weight_update_mb" in m]
    assert len({m["replica_id"] for m in updates}) == replicas, "every replica loaded trained steps"
    for replica in {m["replica_id"] for m in updates}:
        loaded = {m["step"]: m for m in updates if m["replica_id"] == replica}
        broadcast = {step for step, m in loaded.items() if m["inference/weight_broadcast_mb"] > 0}
        sources = {step: m["inference/weight_trainer_mb"] for step, m in loaded.items()}
        # Once the group formed (as the replicas started; step 1 may still beat it), every step a
        # replica loaded came by broadcast.
        assert broadcast and all(step in broadcast for step in loaded if step >= min(broadcast)), sources
        if replicas == 1:  # max_async_level = 0: batches 3.. were sampled on steps 2.., which it had to load
            assert set(range(2, MAX_STEPS)) <= broadcast, sources
        for step in broadcast:
            assert loaded[step]["inference/weight_broadcast_mb"] in full_mb, loaded[step]
            assert loaded[step]["inference/weight_trainer_mb"] == 0, loaded[step]

    trained = [m for m in trainer if m.get("progress/loss_tokens", 0) > 0]
    assert trained, "no step had a token to train on"
    # float32 on both sides: vLLM sampled with exactly the trainer's weights (steps 2.. with broadcast ones).
    assert max(m["mismatch_kl/mean"] for m in trained) < 0.01, trained
