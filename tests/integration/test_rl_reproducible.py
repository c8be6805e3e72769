"""Same seed, same curve: `rlbus rl` twice on the quickstart config (max_async_level 0, one seed)
gives the same rewards and losses step by step; another seed gives other rollouts.

The policy is the quickstart's model after its SFT warm-up, so rollouts earn rewards (an untrained
model earns none, and every step's reward would be 0 in both runs whatever they sampled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.conftest import free_tcp_port
from tests.integration.small_run import loopback_endpoints

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart"
MAX_STEPS = 3
COMPARED = ("orchestrator/reward/all/mean", "trainer/loss/mean")
TIMEOUT_S = 1200


def rlbus(*args: str | Path) -> None:
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    result = subprocess.run([sys.executable, "-m", "rlbus", *map(str, args)], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def warmed_up(tmp_path_factory) -> Path:
    """The quickstart's model (configs/quickstart/model.toml) after its SFT (configs/quickstart/sft.toml)."""
    out = tmp_path_factory.mktemp("quickstart")
    shape = tomllib.loads((QUICKSTART / "model.toml").read_text()) | {"out": out / "model"}
    model = build_tiny_model(out / "model", TinyModelConfig(**shape))
    rlbus("sft", "@", QUICKSTART / "sft.toml", "--model", model, "--output-dir", out / "sft")
    sft_steps = tomllib.loads((QUICKSTART / "sft.toml").read_text())["max_steps"]
    return out / "sft" / "weights" / f"step_{sft_steps}"


def run_steps(tmp_path: Path, name: str, model: Path, seed: int) -> list[dict]:
    """Rows of steps.jsonl of the quickstart's RL config for ``MAX_STEPS`` steps, on free ports."""
    port, run = free_tcp_port(), tmp_path / name
    override = tmp_path / f"{name}.toml"
    override.write_text(f"""
output_dir = "{run}"
max_steps = {MAX_STEPS}
seed = {seed}

[bus.endpoints]
{loopback_endpoints()}

[trainer.scheduler]
warmup_steps = {MAX_STEPS}  # the quickstart's 5 would outlast the run (refused before start)

[inference]
port = {port}

[env_worker]
inference_urls = ["http://127.0.0.1:{port}/v1"]
""")
    rlbus("rl", "@", QUICKSTART / "rl.toml", "@", override, "--model", model)
    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1)), rows
    return rows


def curve(rows: list[dict]) -> list[tuple[float, ...]]:
    return [tuple(row[key] for key in COMPARED) for row in rows]


def test_same_seed_same_curve_at_async_level_0(tmp_path, warmed_up):
    rl = tomllib.loads((QUICKSTART / "rl.toml").read_text())
    assert rl["orchestrator"]["max_async_level"] == 0, "the guarantee holds on-policy only"
    first = run_steps(tmp_path, "first", warmed_up, seed=rl["seed"])
    again = run_steps(tmp_path, "again", warmed_up, seed=rl["seed"])
    other = run_steps(tmp_path, "other", warmed_up, seed=rl["seed"] + 1)

    assert any(reward > 0 for reward, _ in curve(first)), curve(first)  # else the rewards compare nothing
    # Rewards exactly equal: every completion request carries its own seed, the batch is in draw order,
    # and float32 vLLM on the CPU samples the same tokens whatever else shares its batch. Losses equal
    # to float32 rounding: on an idle machine bit for bit, but in CI under load one run's step-1 loss
    # differed in the 7th digit (0.0081403777 vs 0.0081403807, same batch and rewards; cause not pinned
    # down, likely the CPU kernels' reduction order on a loaded machine).
    assert [reward for reward, _ in curve(again)] == [reward for reward, _ in curve(first)]
    # The loss is a mean of advantage-weighted terms that nearly cancel (~0.008 from terms of ~0.1-1), so
    # float32 rounding shows as a relative error: a second CI run differed by 1.1e-7 absolute (1.4e-5
    # relative) with the same rewards and tokens. Compared in absolute units, well above that noise
    # and far below any real difference in what was trained.
    assert [loss for _, loss in curve(again)] == pytest.approx([loss for _, loss in curve(first)], rel=1e-5, abs=1e-6)
    tokens = "orchestrator/num_completion_tokens/sum"
    assert [row[tokens] for row in again] == [row[tokens] for row in first]
    # Another seed draws other examples and other samples: the comparison above can fail.
    assert curve(other) != curve(first)
    assert [row[tokens] for row in other] != [row[tokens] for row in first]
