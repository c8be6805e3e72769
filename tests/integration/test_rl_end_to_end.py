"""`rlbus rl` end to end: five real services (vLLM on CPU) learn for a few steps and stop cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlbus.jsonl import read_json_objects as read_jsonl
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.conftest import free_tcp_port
from tests.integration.small_run import TRAINING_TOML, loopback_endpoints

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("inference", "trainer", "orchestrator", "env-worker", "monitor")
MAX_STEPS = 3


def run_config(tmp_path: Path, model: Path) -> Path:
    endpoints = loopback_endpoints()
    path = tmp_path / "rl.toml"
    path.write_text(f"""
model = "{model}"
output_dir = "{tmp_path / "run"}"
max_steps = {MAX_STEPS}
num_env_workers = 2

[bus.endpoints]
{endpoints}

[inference]
port = {free_tcp_port()}
max_model_len = 512

{TRAINING_TOML}
[monitor]
console = true
""")
    return path


def test_rl_run_trains_contiguous_steps_and_exits_cleanly(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    config = run_config(tmp_path, model)
    result = subprocess.run(
        [sys.executable, "-m", "rlbus", "rl", "@", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    run = tmp_path / "run"
    assert result.returncode == 0, result.stderr[-4000:]

    for service in SERVICES:
        log = run / "logs" / f"{service}.log"
        assert log.exists() and log.stat().st_size > 0, f"{service} wrote no log"
    assert {p.stem for p in (run / "configs").glob("*.toml")} >= set(SERVICES) | {"rl"}

    metrics = read_jsonl(run / "metrics.jsonl")
    by_service = {s: [m for m in metrics if m["service"] == s] for s in ("trainer", "orchestrator")}
    trainer_steps = sorted({m["step"] for m in by_service["trainer"] if "loss/mean" in m})
    assert trainer_steps == list(range(1, MAX_STEPS + 1)), trainer_steps
    rewards = {m["step"]: m["reward/all/mean"] for m in by_service["orchestrator"] if "reward/all/mean" in m}
    assert sorted(rewards) == list(range(1, MAX_STEPS + 1)), rewards
    assert all(0.0 <= r <= 1.0 for r in rewards.values())

    # Weights reached inference: later batches were sampled by newer policies.
    sampled = [m["policy/sampled_step/max"] for m in by_service["orchestrator"] if "policy/sampled_step/max" in m]
    assert sampled and max(sampled) >= 1, sampled
    trained = [m for m in by_service["trainer"] if m.get("progress/loss_tokens", 0) > 0]
    assert trained, "no step had a token to train on"
    assert all(m["entropy/mean"] > 0 for m in trained), trained
    # float32 on both sides and a small learning rate: trainer and vLLM agree on the sampling logprobs.
    assert max(m["mismatch_kl/mean"] for m in trained) < 0.01, trained

    check_front_door(run, result.stderr)


def check_front_door(run: Path, launcher_output: str) -> None:
    """What a person reads: steps.jsonl, samples.jsonl, the summary, logs without request lines."""
    rows = read_jsonl(run / "steps.jsonl")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1)), [r["step"] for r in rows]
    for row in rows:
        assert row["complete"] and "trainer/loss/mean" in row and "orchestrator/reward/all/mean" in row, row
        assert "orchestrator/reward/reverse-text/lcs_reward/mean" in row, sorted(row)
        assert row["orchestrator/num_completion_tokens/sum"] > 0 and "orchestrator/is_truncated/mean" in row
        assert any(key.startswith(("inference/", "env_worker/")) for key in row), sorted(row)
    samples = read_jsonl(run / "samples.jsonl")
    assert samples, "no samples"
    for sample in samples:
        assert sample["answer"] and sample["finish_reason"] in ("stop", "length"), sample
        assert sample["num_prompt_tokens"] > 0 and 0 <= sample["num_completion_tokens"] <= 32, sample
        assert 0 <= sample["policy_step"] < MAX_STEPS, sample
    assert "run summary:" in launcher_output and f"steps done: {MAX_STEPS}" in launcher_output
    assert f"steps.jsonl: {run / 'steps.jsonl'}" in launcher_output
    # The monitor drew the charts as it stopped, before the summary listed them.
    charts = sorted(path.name for path in (run / "charts").glob("*.png"))
    assert charts == sorted(f"{name}.png" for name in ("reward", "loss", "entropy", "mismatch_kl", "throughput",
                                                       "step_time")), charts  # fmt: skip
    assert f"charts: {run / 'charts' / 'entropy.png'}, " in launcher_output
    assert "HTTP Request" not in (run / "logs" / "env-worker.log").read_text()
