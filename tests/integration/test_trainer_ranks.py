"""Ranks started by rlbus itself (``num_ranks``; :mod:`rlbus.ranks`, gloo on the CPU) train like one rank.

``rlbus sft --num-ranks 2`` and ``rlbus rl`` with a two-rank trainer against the same runs with one
rank: the same steps, each with the same loss within float32 rounding (the ranks sum their
gradients over gloo, a different reduction order than one process), and a log per rank. The
two-rank RL run is also placed on two pretend GPUs (``RLBUS_FAKE_GPU_COUNT``, tests only), shared by
two inference replicas and the trainer's two ranks: the launcher starts a replica per GPU, and the
env-workers spread their requests over both (each request carries its seed: the same tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlbus.services.cli import main as rlbus
from rlbus.services.run_config.placement import FAKE_GPU_COUNT_VARIABLE
from tests.conftest import free_tcp_port
from tests.integration.small_run import TRAINING_TOML, loopback_endpoints
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
RL_TIMEOUT_S = 600


def step_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]


def sft_losses(model: Path, run: Path, num_ranks: int) -> list[float]:
    argv = ["sft", "--model", str(model), "--output-dir", str(run), "--max-steps", str(STEPS),
            "--data.synthetic", "reverse-text", "--data.num-examples", "48", "--batch-size", "16",
            "--seq-len", "256", "--optimizer.lr", "3e-3", "--peak-flops", "1e11", "--num-ranks", str(num_ranks),
            "--bus.endpoints.monitor-telemetry", "tcp://127.0.0.1:9"]  # fmt: skip
    assert rlbus(argv) == 0
    rows = step_rows(run)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), rows
    return [row["sft/loss/mean"] for row in rows]


def test_sft_two_ranks_match_one_rank(tiny_model_dir, tmp_path):  # noqa: F811
    one = sft_losses(tiny_model_dir, tmp_path / "one", num_ranks=1)
    two = sft_losses(tiny_model_dir, tmp_path / "two", num_ranks=2)
    print(f"sft loss per step, 1 rank {one}, 2 ranks {two}")
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    assert one[-1] < one[0]  # it trained: a later step's loss follows from the earlier updates
    logs = tmp_path / "two" / "logs"
    assert "joined the process group" in (logs / "sft" / "rank_1.log").read_text()
    assert "joined the process group" in (logs / "sft" / "rank_0.log").read_text()
    assert not (tmp_path / "one" / "logs" / "sft").exists()


def rl_rows(tmp_path: Path, model: Path, name: str, placement: str, gpus: int = 0) -> list[dict]:
    """steps.jsonl of a 3-step ``rlbus rl`` run with ``placement`` (TOML) on ``gpus`` pretend GPUs."""
    run, path = tmp_path / name, tmp_path / f"{name}.toml"
    path.write_text(f"""
model = "{model}"
output_dir = "{run}"
max_steps = {STEPS}
{placement}

[bus.endpoints]
{loopback_endpoints()}

[inference]
port = {free_tcp_port()}
max_model_len = 512

[trainer]
num_threads = 1
{TRAINING_TOML}""")
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    if gpus:
        env[FAKE_GPU_COUNT_VARIABLE] = str(gpus)
    result = subprocess.run([sys.executable, "-m", "rlbus", "rl", "@", str(path)], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=RL_TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = step_rows(run)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), rows
    return rows


@pytest.mark.vllm
def test_rl_with_two_trainer_ranks_matches_one(tiny_model_dir, tmp_path):  # noqa: F811
    one = rl_rows(tmp_path, tiny_model_dir, "one", "")
    shared = "inference_gpu_ids = [0, 1]\ntrainer_gpu_ids = [0, 1]\ntrainer_gpu_memory_fraction = 0.5"
    two = rl_rows(tmp_path, tiny_model_dir, "two", shared, gpus=2)
    tokens, loss = "orchestrator/num_completion_tokens/sum", "trainer/loss/mean"
    print(f"rl loss per step, 1 rank {[r[loss] for r in one]}, 2 ranks {[r[loss] for r in two]}")
    # The same batches (every request carries its own seed), so the same losses up to float32 rounding.
    assert [row[tokens] for row in two] == [row[tokens] for row in one]
    assert [row[loss] for row in two] == pytest.approx([row[loss] for row in one], rel=1e-5, abs=1e-6)
    logs = tmp_path / "two" / "logs"
    assert "joined the process group" in (logs / "trainer" / "rank_1.log").read_text()
    assert "2 ranks of trainer started" in (logs / "trainer.log").read_text()
    for replica in ("inference-0", "inference-1"):  # both replicas served the trained policy
        assert f"now serving policy step {STEPS}" in (logs / f"{replica}.out").read_text(), replica
