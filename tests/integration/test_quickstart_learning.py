"""The quickstart's claim, kept true: on first-letter, RL raises greedy held-out accuracy by at least 0.3.

The configs of ``./scripts/quickstart.sh`` as they are (configs/quickstart/model.toml, then
configs/first_letter/sft.toml and rl.toml) on free ports: a tiny model warmed up on a flawed teacher's
answers, then RL with all five services, evaluated greedily on held-out words before and after. The
summary's last line is read the way a user reads it.
"""

from __future__ import annotations

import os
import re
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
CONFIGS = ROOT / "configs" / "first_letter"
MIN_RISE = 0.3
"""Issue 18's bar; measured here: 0.14 -> 0.95 (2-core CPU)."""


def run(*args: str | Path) -> str:
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    result = subprocess.run([sys.executable, *map(str, args)], check=False, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1500)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_rl_raises_greedy_held_out_accuracy_where_sft_on_the_teacher_does_not(tmp_path):
    shape = tomllib.loads((ROOT / "configs" / "quickstart" / "model.toml").read_text()) | {"out": tmp_path / "model"}
    model = build_tiny_model(tmp_path / "model", TinyModelConfig(**shape))
    run("-m", "rlbus", "sft", "@", CONFIGS / "sft.toml", "--model", model, "--output-dir", tmp_path / "sft")
    sft_steps = tomllib.loads((CONFIGS / "sft.toml").read_text())["max_steps"]
    port = free_tcp_port()
    override = tmp_path / "ports.toml"
    override.write_text(f'[bus.endpoints]\n{loopback_endpoints()}\n[inference]\nport = {port}\n'
                        f'[env_worker]\ninference_urls = ["http://127.0.0.1:{port}/v1"]\n')  # fmt: skip
    run("-m", "rlbus", "rl", "@", CONFIGS / "rl.toml", "@", override, "--model",
        tmp_path / "sft" / "weights" / f"step_{sft_steps}", "--output-dir", tmp_path / "rl")  # fmt: skip
    summary = run(ROOT / "scripts" / "summarize_run.py", tmp_path / "rl", "--eval", "first-letter-greedy")
    last = summary.splitlines()[-1]
    match = re.fullmatch(r"eval before (\S+) after (\S+)", last)
    assert match, summary
    before, after = map(float, match.groups())
    assert after - before >= MIN_RISE, summary
