"""`rlbus rl` with CurveZMQ on and every service bound to 0.0.0.0: the launcher hands the key folder to
all five services (vLLM's worker included), and the run trains and stops cleanly."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from rlbus.services.cli import main as rlbus
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.integration.test_rl_end_to_end import ROOT, SERVICES, read_jsonl, run_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MAX_STEPS = 2


def test_rl_run_with_curve_keys_on_all_interfaces(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    keys = tmp_path / "keys"
    assert rlbus(["keys", "--out", str(keys)]) == 0
    command = [sys.executable, "-m", "rlbus", "rl", "@", str(run_config(tmp_path, model)),
               "--max-steps", str(MAX_STEPS), "--num-env-workers", "1",
               "--bus.bind-host", "0.0.0.0", "--bus.curve.keys-dir", str(keys)]  # fmt: skip
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    run = tmp_path / "run"
    assert result.returncode == 0, result.stderr[-4000:]

    for service in SERVICES:
        resolved = tomllib.loads((run / "configs" / f"{service}.toml").read_text())
        assert resolved["bus"]["curve"]["keys_dir"] == str(keys), service
    for binder in ("orchestrator", "trainer", "monitor"):  # each bound 0.0.0.0 behind its ZAP handler
        assert "CurveZMQ: admitting 1 client key(s)" in (run / "logs" / f"{binder}.log").read_text(), binder

    metrics = read_jsonl(run / "metrics.jsonl")
    trainer_steps = sorted({m["step"] for m in metrics if m["service"] == "trainer" and "loss/mean" in m})
    assert trainer_steps == list(range(1, MAX_STEPS + 1)), trainer_steps
    # Weights crossed the Curve bus into vLLM's worker: a later batch was sampled by policy 1.
    sampled = [m["policy/sampled_step/max"] for m in metrics if "policy/sampled_step/max" in m]
    assert sampled and max(sampled) >= 1, sampled
    assert not any("refused a peer" in (run / "logs" / f"{s}.log").read_text() for s in SERVICES)
