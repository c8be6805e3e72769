"""``rlbus sft`` with ``[lora]``: the adapter learns, resumes from its checkpoint, the base stays put."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlbus.services.cli import main as rlbus
from tests.conftest import free_tcp_port
from tests.integration.trainer_fakes import FakeMonitor

pytestmark = pytest.mark.slow


def sft_argv(model_dir, out, max_steps: int) -> list[str]:
    return ["--model", str(model_dir), "--output-dir", str(out), "--max-steps", str(max_steps),
            "--data.synthetic", "reverse-text", "--data.num-examples", "64", "--batch-size", "16",
            "--seq-len", "256", "--optimizer.lr", "5e-3", "--peak-flops", "1e11",
            "--lora.rank", "4", "--lora.target-modules", '["q_proj", "v_proj"]',
            "--ckpt.enabled", "--ckpt.interval", "3", "--ckpt.resume-step", "-1",
            "--bus.endpoints.monitor-telemetry", f"tcp://127.0.0.1:{free_tcp_port()}"]  # fmt: skip


def run_sft(argv: list[str], steps: list[int]) -> dict[int, dict]:
    with FakeMonitor(argv[-1]) as monitor:
        assert rlbus(["sft", *argv]) == 0
        return monitor.wait_for_metrics(steps=len(steps))


def test_lora_sft_learns_resumes_and_leaves_the_base(tiny_model_dir, tmp_path):
    first = run_sft(sft_argv(tiny_model_dir, tmp_path, 3), [1, 2, 3])
    assert sorted(first) == [1, 2, 3]
    adapter = tmp_path / "checkpoints" / "step_3" / "model"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    resumed = run_sft(sft_argv(tiny_model_dir, tmp_path, 6), [4, 5, 6])
    assert sorted(resumed) == [4, 5, 6]  # went on from the adapter's checkpoint
    assert resumed[6]["loss/mean"] < first[1]["loss/mean"]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "weights" / "step_6", dtype=torch.float32)
    for (name, original), (_, merged) in zip(base.named_parameters(), served.named_parameters(), strict=True):
        adapted = name.endswith(("q_proj.weight", "v_proj.weight"))
        assert torch.equal(original, merged) != adapted, name
    progress = json.loads((tmp_path / "checkpoints" / "step_6" / "progress.json").read_text())
    assert progress["step"] == 6
