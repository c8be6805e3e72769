"""TrainStep without sockets: the loss it reports, its metrics, and exact resumption."""

from pathlib import Path

import numpy as np
import pytest
import torch

from rlbus.services.trainer.config import CheckpointConfig, LossConfig, SchedulerConfig, TrainerConfig
from rlbus.services.trainer.logprobs import RowTensors, row_logprobs
from rlbus.services.trainer.runtime import build_runtime
from tests.unit.trainer.batches import train_batch

METRICS = {"loss/mean", "entropy/mean", "mismatch_kl/mean", "mismatch_kl/max", "masked_advantage_positive/mean",
           "masked_advantage_negative/mean", "optim/lr", "optim/grad_norm", "perf/throughput", "perf/mfu",
           "perf/peak_memory", "time/forward_backward"}  # fmt: skip


def config(model_dir: Path, output_dir: Path, **overrides) -> TrainerConfig:
    values = {
        "model": str(model_dir),
        "output_dir": output_dir,
        "max_steps": 6,
        "peak_flops": 1e11,
        "optimizer": {"lr": 1e-3},
        "scheduler": SchedulerConfig(type="cosine", warmup_steps=2),
    }
    return TrainerConfig(**{**values, **overrides})


def rows(step: int) -> tuple[list[RowTensors], int]:
    batch = train_batch(step)
    return [RowTensors.from_message(m, torch.device("cpu")) for m in batch.micro_batches], batch.num_loss_tokens


def test_on_policy_step_reports_the_mean_negative_advantage(tiny_model_dir, tmp_path):
    runtime = build_runtime(config(tiny_model_dir, tmp_path), LossConfig(), total_steps=6)
    batch_rows, num_loss_tokens = rows(1)
    # Make the batch exactly on-policy: sampling logprobs = the trainer's own.
    with torch.no_grad():
        for row in batch_rows:
            row.inference_logprobs = torch.where(row.loss_mask, row_logprobs(runtime.model, row)[0], 0.0)
    before = [p.detach().clone() for p in runtime.model.parameters()]
    metrics = runtime.trainer.run(1, batch_rows, num_loss_tokens)
    assert METRICS <= set(metrics)
    # r = 1 and dp = 0 on every token: nothing masked, loss = -sum(A) / N, no mismatch.
    advantages = torch.cat([r.advantages[r.loss_mask] for r in batch_rows])
    assert metrics["loss/mean"] == pytest.approx(-advantages.sum().item() / num_loss_tokens, abs=1e-6)
    assert metrics["mismatch_kl/mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["masked_advantage_positive/mean"] == metrics["masked_advantage_negative/mean"] == 0.0
    assert metrics["optim/lr"] == pytest.approx(5e-4)  # step 1 of 2 warmup steps
    assert metrics["entropy/mean"] > 0 and metrics["optim/grad_norm"] > 0 and 0 < metrics["perf/mfu"] < 1
    assert any(not torch.equal(a, b) for a, b in zip(before, runtime.model.parameters(), strict=True))


def test_off_policy_batch_reports_mismatch(tiny_model_dir, tmp_path):
    runtime = build_runtime(config(tiny_model_dir, tmp_path), LossConfig(), total_steps=6)
    metrics = runtime.trainer.run(1, *rows(1))
    # Made-up sampling logprobs (-0.1..-7) vs the random model's (~ -5.8): KL > 0, and tokens the
    # sampler found likely (q > 0.2) with A < 0 are masked.
    assert metrics["mismatch_kl/mean"] > 0.01
    assert metrics["mismatch_kl/max"] >= metrics["mismatch_kl/mean"]
    assert 0 < metrics["masked_advantage_positive/mean"] + metrics["masked_advantage_negative/mean"] < 1


def losses(runtime, steps) -> list[float]:
    out = []
    for step in steps:
        out.append(runtime.trainer.run(step, *rows(step))["loss/mean"])
        if runtime.ckpt.due(step):
            runtime.save(step)
    return out


def test_resume_gives_identical_losses(tiny_model_dir, tmp_path):
    straight = losses(build_runtime(config(tiny_model_dir, tmp_path / "a"), LossConfig(), 6), range(1, 7))
    ckpt = CheckpointConfig(enabled=True, interval=3)
    first = build_runtime(config(tiny_model_dir, tmp_path / "b", ckpt=ckpt), LossConfig(), 6)
    head = losses(first, range(1, 4))
    resumed = build_runtime(config(tiny_model_dir, tmp_path / "b", ckpt=ckpt.model_copy(update={"resume_step": -1})),
                            LossConfig(), 6)  # fmt: skip
    assert resumed.start_step == 3
    tail = losses(resumed, range(4, 7))
    assert head + tail == straight
    assert len(set(straight)) == 6  # the steps really differ


def test_checkpoint_layout_snapshot_and_pruning(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = CheckpointConfig(enabled=True, interval=1, keep_last=2, keep_interval=2)
    runtime = build_runtime(config(tiny_model_dir, tmp_path, ckpt=ckpt), LossConfig(), 6)
    losses(runtime, range(1, 6))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_4", "step_5"]
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["step_2", "step_4", "step_5"]
    assert {p.name for p in (tmp_path / "checkpoints/step_5").iterdir()} == {"model", "optimizer.pt", "progress.json"}
    snapshot = AutoModelForCausalLM.from_pretrained(tmp_path / "weights/step_5", dtype=torch.float32)
    trained = dict(runtime.model.named_parameters())
    for name, param in snapshot.named_parameters():
        torch.testing.assert_close(param, trained[name], rtol=0, atol=0)
    # A half-written checkpoint (crash during save) is never resumed from.
    (tmp_path / "checkpoints/step_9.partial").mkdir()
    again = build_runtime(config(tiny_model_dir, tmp_path, ckpt=ckpt.model_copy(update={"resume_step": -1})),
                          LossConfig(), 6)  # fmt: skip
    assert again.start_step == 5 and not (tmp_path / "checkpoints/step_9.partial").exists()
    with pytest.raises(ValueError, match=r"resume_step = 3, but .* only holds steps \[2, 4, 5\]"):
        build_runtime(config(tiny_model_dir, tmp_path, ckpt=ckpt.model_copy(update={"resume_step": 3})),
                      LossConfig(), 6)  # fmt: skip
    assert np.isclose(runtime.trainer.schedule.lr(5), again.trainer.schedule.lr(5))


def test_num_threads_sets_the_threads_of_the_trainers_math(tiny_model_dir, tmp_path):
    before = torch.get_num_threads()
    try:
        build_runtime(config(tiny_model_dir, tmp_path, num_threads=1), LossConfig(), total_steps=6)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
