"""`rlbus rl` with ``[trainer.lora]``: only the adapter trains, the base stays bit-identical, and only
the adapter travels to inference, where vLLM (on CPU too) loads it in place each step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlbus.jsonl import read_json_objects as read_jsonl
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.trainer.lora import base_fingerprint
from rlbus.services.trainer.model import load_model, read_hf_weights
from tests.conftest import free_tcp_port
from tests.integration.small_run import TRAINING_TOML, loopback_endpoints

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 3
LORA_TOML = """
[trainer.lora]
rank = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "up_proj"]

[trainer.ckpt]
save_adapter_separately = true
"""


def run_config(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "rl.toml"
    # lr suits an adapter (1e-5 in TRAINING_TOML would leave B at nearly zero).
    training = TRAINING_TOML.replace("lr = 1e-5", "lr = 5e-3")
    path.write_text(f"""
model = "{model}"
output_dir = "{tmp_path / "run"}"
max_steps = {MAX_STEPS}
num_env_workers = 1

[bus.endpoints]
{loopback_endpoints()}

[inference]
port = {free_tcp_port()}
max_model_len = 512

{training}
{LORA_TOML}
""")
    return path


def test_lora_rl_run_keeps_the_base_and_reports_adapter_bytes(tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    base = load_model(str(model_dir), "float32", torch.device("cpu"))
    result = subprocess.run([sys.executable, "-m", "rlbus", "rl", "@", str(run_config(tmp_path, model_dir))],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=1500)  # fmt: skip
    run = tmp_path / "run"
    assert result.returncode == 0, result.stderr[-4000:]

    trainer = [m for m in read_jsonl(run / "metrics.jsonl") if m["service"] == "trainer" and "loss/mean" in m]
    assert sorted(m["step"] for m in trainer) == list(range(1, MAX_STEPS + 1))
    adapter_bytes = {m["weights/lora_adapter_bytes"] for m in trainer}
    for metrics in trainer:  # what went on the weight channel is the adapter, a fraction of the weights
        assert metrics["weights/published_bytes"] == metrics["weights/lora_adapter_bytes"], metrics
        assert 0 < metrics["weights/lora_adapter_bytes"] < metrics["weights/full_bytes"] / 5, metrics
    # Every weight update of the replica was an adapter of that size, from step 0 (the fresh adapter) on.
    updates = [m for m in read_jsonl(run / "metrics.jsonl")
               if m["service"] == "inference" and "inference/weight_update_mb" in m]  # fmt: skip
    assert len(updates) >= 2 and {m["inference/weight_update_mb"] for m in updates} == {
        size / 1e6 for size in adapter_bytes}  # fmt: skip
    assert min(m["step"] for m in updates) == 0
    [served] = (run / "adapters").glob("*/rlbus-lora/step_*")  # only the serving folder is kept
    assert (served / "adapter_model.safetensors").is_file() and (served / "adapter_config.json").is_file()
    rows = read_jsonl(run / "steps.jsonl")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))

    # The trainer's live base at the last checkpoint is the model it loaded, bit for bit.
    last = run / "checkpoints" / f"step_{MAX_STEPS}" / "model"
    assert json.loads((last / "lora_base.json").read_text())["base_sha256"] == base_fingerprint(base)
    assert not (last / "model.safetensors").exists()
    # weights/step_N is the merged model: the adapted layers moved, the others did not.
    served = read_hf_weights(run / "weights" / f"step_{MAX_STEPS}")
    original = dict(base.named_parameters())
    moved = {name for name, tensor in served.items() if not torch.equal(tensor, original[name])}
    assert moved and all(name.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight")) for name in moved)
    assert (run / "weights" / f"step_{MAX_STEPS}" / "adapter" / "adapter_model.safetensors").is_file()
    # Completions were tagged with the adapter step they sampled on: trained steps, in range.
    samples = read_jsonl(run / "samples.jsonl")
    assert {s["policy_step"] for s in samples} <= set(range(MAX_STEPS + 1))
    assert max(s["policy_step"] for s in samples) >= 1
