"""``--bench`` end to end: ``rlbus rl`` (five real services, vLLM on CPU) and ``rlbus sft`` (the
quickstart's SFT config) run a few real steps, print the table of throughput figures and exit 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.bench_table import ParsedTable, parse_bench_table
from tests.conftest import free_tcp_port
from tests.integration.small_run import TRAINING_TOML, loopback_endpoints

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAINER_FIGURES = ("step s", "trainer tok/s", "MFU %", "peak mem GiB")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(out, TinyModelConfig(out=out))


def rlbus(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # vLLM's CPU KV cache defaults to 4 GiB per replica: 1 is plenty for the tiny model.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    return subprocess.run([sys.executable, "-m", "rlbus", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def assert_trainer_figures_positive(table: ParsedTable, steps: list[int]) -> None:
    assert sorted(table.steps) == steps, table
    for header in TRAINER_FIGURES:
        assert all(float(table.steps[s][header]) > 0 for s in steps), (header, table.steps)
        mean, std = table.mean[header]
        assert mean > 0 and std >= 0, (header, mean, std)


@pytest.mark.vllm
def test_rl_bench_prints_the_table_and_exits_0(tmp_path, tiny_model):
    run = tmp_path / "run"
    config = tmp_path / "rl.toml"
    config.write_text(f"""
model = "{tiny_model}"
output_dir = "{run}"

[bus.endpoints]
{loopback_endpoints()}

[inference]
port = {free_tcp_port()}
max_model_len = 512

{TRAINING_TOML}""")
    result = rlbus("rl", "@", str(config), "--bench", "--max-steps", "3", timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    table = parse_bench_table(result.stdout)
    assert table.title.startswith("rlbus rl bench: 3 steps; mean ± std over steps 2-3"), table.title
    assert_trainer_figures_positive(table, [1, 2, 3])
    assert table.mean["gen tok/s"][0] > 0
    assert {"wait batch s", "fwd+bwd s", "publish s", "generate s"} <= set(table.headers)
    # Checkpoints and W&B were off; the table is in the launcher's log too.
    assert not (run / "checkpoints" / "trainer").exists() and not (run / "weights").exists()
    assert tomllib.loads((run / "configs" / "monitor.toml").read_text())["wandb"]["enabled"] is False
    assert "rlbus rl bench: 3 steps" in (run / "logs" / "rl.log").read_text()


def test_sft_bench_on_the_quickstart_config_prints_the_table_and_exits_0(tmp_path, tiny_model):
    run = tmp_path / "sft"
    telemetry = f"tcp://127.0.0.1:{free_tcp_port()}"  # no monitor listens: reports are dropped
    result = rlbus("sft", "@", str(ROOT / "configs" / "quickstart" / "sft.toml"), "--model", str(tiny_model),
                   "--output-dir", str(run), "--bench", "--bus.endpoints.monitor-telemetry", telemetry,
                   timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    table = parse_bench_table(result.stdout)
    # The config's max_steps = 45 is for training: the bench runs 5.
    assert table.title.startswith("rlbus sft bench: 5 steps; mean ± std over steps 2-5"), table.title
    assert_trainer_figures_positive(table, [1, 2, 3, 4, 5])
    assert not (run / "checkpoints").exists() and not (run / "weights").exists()


def test_weights_bench_quick_prints_every_ratio_against_raw_loopback():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "weights.py"), "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    raw = float(re.search(r"ratios against (\d+)", next(ln for ln in lines if ln.startswith("raw zmq"))).group(1))
    assert raw > 0
    ratios = {line.split("MB/s")[0].strip(): float(line.rsplit("/ raw", 1)[1]) for line in lines if "/ raw" in line}
    expected = ["fetch + verify", "publish -> loaded", "delta fetch + verify", "1 replica(s)", "2 replica(s)"]
    assert all(any(name.startswith(want) for name in ratios) for want in expected), ratios
    assert all(ratio > 0 for ratio in ratios.values()), ratios
    wire = next(line for line in lines if "bytes on the wire per step" in line)
    full, delta = (float(x) for x in re.search(r"([\d.]+) MB full, ([\d.]+) MB delta", wire).groups())
    assert 0 < delta < full, wire  # the quick model's steps differ by a small update: deltas are smaller
