"""trainer.compile: the same steps as eager, a warm-up that trains nothing, no recompiles after it,
and clear refusals where it is not supported."""

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch._dynamo.utils import counters

from rlbus.services.trainer.compile import CompileWarmup
from rlbus.services.trainer.config import LossConfig, TrainerConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.logprobs import RowTensors
from rlbus.services.trainer.runtime import build_runtime, start_compile
from tests.unit.trainer.batches import micro_batch, train_batch

pytestmark = pytest.mark.slow  # compiles the tiny model (~15 s the first time on 2 cores)


def config(model_dir: Path, output_dir: Path, **overrides) -> TrainerConfig:
    values = {"model": str(model_dir), "output_dir": output_dir, "max_steps": 3, "peak_flops": 1e11,
              "optimizer": {"lr": 1e-3}}  # fmt: skip
    return TrainerConfig(**{**values, **overrides})


def rows_of(batch) -> list[RowTensors]:
    return [RowTensors.from_message(m, torch.device("cpu")) for m in batch.micro_batches]


def test_compiled_steps_match_eager_and_warmup_trains_nothing(tiny_model_dir, tmp_path):
    torch._dynamo.reset()
    counters.clear()
    eager = build_runtime(config(tiny_model_dir, tmp_path / "eager"), LossConfig(), total_steps=3)
    compiled = build_runtime(config(tiny_model_dir, tmp_path / "compiled", compile=True), LossConfig(),
                             total_steps=3)  # fmt: skip
    compiled.trainer._await_warmup()
    # The warm-up ran forward and backward but left weights, gradients and optimizer as loaded.
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert b.grad is None, name
    assert not compiled.optimizer.state
    assert counters["stats"]["unique_graphs"] == 2  # one sample a row, and several
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    rng = np.random.default_rng(0)
    # Rows of one sample and of three, of lengths the warm-up never saw: no recompile.
    extra = [micro_batch(rng, lengths=((7, 12),)), micro_batch(rng, lengths=((3, 5), (9, 4), (6, 6)))]
    for step in (1, 2):
        batch = train_batch(step)
        batch.micro_batches.extend(extra)
        ours = eager.trainer.run(step, rows_of(batch), batch.num_loss_tokens)
        theirs = compiled.trainer.run(step, rows_of(batch), batch.num_loss_tokens)
        for key in ("loss/mean", "entropy/mean", "mismatch_kl/mean", "optim/grad_norm"):
            assert theirs[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), key
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup
    # Step 2's metrics above already saw step 1's update. Weights agree up to AdamW's sign-like steps
    # on gradients near 0, where float rounding may flip a sign: at most 2 x lr a step.
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        assert float((a - b).detach().abs().max()) <= 2 * 2 * 1e-3 + 1e-6, name
    # Parameter names stay the Hugging Face ones that leave the trainer.
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]


class Broken(torch.nn.Module):
    config = type("Config", (), {"vocab_size": 16})()

    def forward(self, **_):
        raise TypeError("this model does not run")


def test_a_warmup_that_fails_stops_the_first_step_with_the_setting_to_change():
    warmup = CompileWarmup(Broken(), padded=True, device=torch.device("cpu")).start()
    with pytest.raises(RuntimeError, match=r"trainer.compile: compiling the model failed \(TypeError: this model "
                                           r"does not run\); set trainer.compile = false"):  # fmt: skip
        warmup.wait()
    warmup.wait()  # once raised, the step does not wait again


def test_compile_is_refused_with_several_ranks_and_with_a_shared_trainer(tiny_model_dir, tmp_path):
    two_ranks = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="trainer.compile runs one rank only for now, and this trainer has 2"):
        start_compile(torch.nn.Linear(2, 2), config(tiny_model_dir, tmp_path, compile=True), two_ranks)
    with pytest.raises(ValidationError, match="max_concurrent_runs with compile is not supported yet"):
        TrainerConfig(model=str(tiny_model_dir), output_dir=tmp_path, compile=True, max_concurrent_runs=2)


def test_a_compiled_lora_step_matches_eager(tiny_model_dir, tmp_path):
    lora = {"rank": 8, "alpha": 16}
    eager = build_runtime(config(tiny_model_dir, tmp_path / "eager", lora=lora), LossConfig(), total_steps=3)
    compiled = build_runtime(config(tiny_model_dir, tmp_path / "compiled", lora=lora, compile=True), LossConfig(),
                             total_steps=3)  # fmt: skip
    for step in (1, 2):
        batch = train_batch(step)
        ours = eager.trainer.run(step, rows_of(batch), batch.num_loss_tokens)
        theirs = compiled.trainer.run(step, rows_of(batch), batch.num_loss_tokens)
        for key in ("loss/mean", "entropy/mean", "optim/grad_norm"):
            assert theirs[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), key
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]
