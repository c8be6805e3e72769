"""``rlbus sft`` end to end on the synthetic reverse-text set with the tiny model."""

import json

import pytest
import torch

from rlbus.config import ConfigError, load_config
from rlbus.services.cli import main as rlbus
from rlbus.services.trainer.sft import SftPlan
from rlbus.services.trainer.sft_config import SftConfig
from tests.conftest import free_tcp_port
from tests.integration.trainer_fakes import FakeMonitor

pytestmark = pytest.mark.slow


def test_sft_learns_reverse_text_validates_and_saves(tiny_model_dir, tmp_path):
    telemetry = f"tcp://127.0.0.1:{free_tcp_port()}"
    argv = ["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--max-steps", "8",
            "--data.synthetic", "reverse-text", "--data.num-examples", "64", "--data.val-fraction", "0.2",
            "--batch-size", "16", "--seq-len", "256", "--val-interval", "4", "--optimizer.lr", "3e-3",
            "--peak-flops", "1e11", "--bus.endpoints.monitor-telemetry", telemetry]  # fmt: skip
    with FakeMonitor(telemetry) as monitor:
        assert rlbus(["sft", *argv]) == 0
        metrics = monitor.wait_for_metrics(steps=8)
    assert sorted(metrics) == list(range(1, 9))
    assert metrics[8]["loss/mean"] < 0.8 * metrics[1]["loss/mean"]
    assert "val/loss" in metrics[4] and "val/loss" in metrics[8] and "val/loss" not in metrics[5]
    assert metrics[8]["val/loss"] < metrics[4]["val/loss"]
    assert (tmp_path / "weights/step_8/model.safetensors").exists()  # final weights even with checkpoints off
    assert not (tmp_path / "checkpoints").exists()
    from transformers import AutoModelForCausalLM

    snapshot = AutoModelForCausalLM.from_pretrained(tmp_path / "weights/step_8", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not torch.equal(snapshot.model.norm.weight, base.model.norm.weight)
    assert "sft [" in (tmp_path / "logs/sft.log").read_text()  # the progress bar
    # The run folder has the files an RL run's monitor writes: one steps row per step.
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all({"sft/loss/mean", "sft/optim/lr", "sft/progress/tokens", "sft/time/step", "elapsed_s"} <= set(r)
               for r in rows)  # fmt: skip
    assert rows[7]["sft/loss/mean"] == pytest.approx(metrics[8]["loss/mean"])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 8


def test_plan_is_a_function_of_the_step():
    plan = SftPlan(num_examples=10, batch_size=4, seed=1, shuffle=True)
    assert plan.steps_per_epoch == 3
    epoch = [plan.indices(s) for s in (1, 2, 3)]
    assert sorted(i for part in epoch for i in part) == list(range(10))
    assert [list(plan.indices(s)) for s in (1, 2, 3)] == [list(p) for p in epoch]
    assert list(plan.indices(4)) != list(plan.indices(1))  # a new order per epoch


def test_data_source_must_be_given_once():
    with pytest.raises(ConfigError, match="set exactly one of data.path"):
        load_config(SftConfig, ["--data.path", "x.jsonl", "--data.synthetic", "reverse-text"], env={})


def test_synthetic_text_lengths_follow_min_and_max_words():
    from rlbus.services.trainer.sft import load_examples

    argv = ["--data.synthetic", "reverse-text", "--data.num-examples", "50", "--data.min-words", "2",
            "--data.max-words", "3"]  # fmt: skip
    train, _ = load_examples(load_config(SftConfig, argv, env={}))
    assert {len(row["prompt"][1]["content"].split()) for row in train} == {2, 3}
    with pytest.raises(ConfigError, match=r"data.min_words \(3\) must not exceed data.max_words \(2\)"):
        load_config(SftConfig, ["--data.synthetic", "reverse-text", "--data.min-words", "3", "--data.max-words", "2"],
                    env={})  # fmt: skip
