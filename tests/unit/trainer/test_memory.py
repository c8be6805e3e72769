"""``memory.*``: activation checkpointing and micro-batches change memory and speed, never the numbers."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from rlbus.services.trainer.config import LossConfig, MemoryConfig, SchedulerConfig
from rlbus.services.trainer.distributed import DistContext, shard_model
from rlbus.services.trainer.logprobs import RowTensors, concat_rows, sample_ids
from rlbus.services.trainer.model import enable_activation_checkpointing, load_model
from rlbus.services.trainer.schedule import LRSchedule
from rlbus.services.trainer.train_step import TrainStep
from tests.unit.trainer.batches import train_batch

SOLO = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def rows(step: int = 1, num_micro_batches: int = 5) -> tuple[list[RowTensors], int]:
    batch = train_batch(step, num_micro_batches=num_micro_batches)
    return [RowTensors.from_message(m, SOLO.device) for m in batch.micro_batches], batch.num_loss_tokens


def loss_and_gradients(model_dir, ac: int = 0, micro_batch_size: int = 1,
                       padded: bool = False) -> tuple[float, dict[str, torch.Tensor]]:  # fmt: skip
    """The step's loss and the gradients it leaves (the rate is 0 and clipping is off, so the
    optimizer step changes nothing and the gradients stay as the backward left them)."""
    torch.manual_seed(0)
    model = load_model(str(model_dir), "float32", SOLO.device)
    enable_activation_checkpointing(model, ac)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    schedule = LRSchedule(0.0, SchedulerConfig(), None)
    trainer = TrainStep(model, optimizer, schedule, SOLO, max_grad_norm=1e30, loss=LossConfig(), peak_flops=1e11,
                        padded_rows=padded, micro_batch_size=micro_batch_size)  # fmt: skip
    metrics = trainer.run(1, *rows())
    return metrics["loss/mean"], {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(expected: tuple[float, dict], actual: tuple[float, dict], rtol: float, atol: float) -> None:
    assert actual[0] == pytest.approx(expected[0], rel=rtol, abs=atol)
    assert list(actual[1]) == list(expected[1])
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("ac", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, ac, padded):
    assert_same(loss_and_gradients(tiny_model_dir, padded=padded),
                loss_and_gradients(tiny_model_dir, ac=ac, padded=padded), rtol=1e-6, atol=1e-7)  # fmt: skip


def test_activation_checkpointing_recomputes_every_kth_layer_in_the_backward(tiny_model_dir):
    model = load_model(str(tiny_model_dir), "float32", SOLO.device)
    enable_activation_checkpointing(model, 2)
    calls = [0] * len(model.model.layers)
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    row = rows()[0][0]
    model(input_ids=row.input_ids[None], position_ids=row.position_ids[None]).logits.sum().backward()
    assert calls == [2, 1]  # layer 0 ran again in the backward; layer 1 kept its activations


@pytest.mark.parametrize("micro_batch_size", [2, 3, 5])
@pytest.mark.parametrize("padded", [False, True])
def test_micro_batches_of_several_rows_equal_one_row_at_a_time(tiny_model_dir, micro_batch_size, padded):
    assert_same(loss_and_gradients(tiny_model_dir, padded=padded),
                loss_and_gradients(tiny_model_dir, micro_batch_size=micro_batch_size, padded=padded),
                rtol=1e-5, atol=1e-6)  # fmt: skip


def test_concatenated_rows_keep_their_samples_apart():
    batch_rows, _ = rows(num_micro_batches=3)
    joined = concat_rows(batch_rows)
    assert joined.num_tokens == sum(r.num_tokens for r in batch_rows)
    samples_per_row = [int(sample_ids(r.position_ids).max()) + 1 for r in batch_rows]
    assert int(sample_ids(joined.position_ids).max()) + 1 == sum(samples_per_row)
    assert concat_rows(batch_rows[:1]) is batch_rows[0]


def test_ac_offload_without_ac_is_refused():
    with pytest.raises(ValidationError, match="set memory.ac >= 1"):
        MemoryConfig(ac_offload=True)
    assert MemoryConfig(ac=2, ac_offload=True).ac == 2


def test_ac_offload_on_a_cpu_is_refused_by_name(tiny_model_dir):
    model = load_model(str(tiny_model_dir), "float32", SOLO.device)
    with pytest.raises(ValueError, match="memory.ac_offload .* on a CPU"):
        enable_activation_checkpointing(model, 1, offload=True)


def test_optimizer_offload_on_one_cpu_rank_is_refused_by_name(tiny_model_dir):
    model = load_model(str(tiny_model_dir), "float32", SOLO.device)
    with pytest.raises(ValueError, match=r"memory.offload_optimizer needs FSDP2 on GPUs.*1 rank\(s\) on cpu"):
        shard_model(model, SOLO, offload=True)


def test_the_memory_settings_reach_the_model_and_the_step(tiny_model_dir, tmp_path):
    from rlbus.services.trainer.config import TrainerConfig
    from rlbus.services.trainer.runtime import build_runtime

    config = TrainerConfig(model=str(tiny_model_dir), output_dir=tmp_path, peak_flops=1e11,
                           memory={"ac": 2, "micro_batch_size": 3})  # fmt: skip
    runtime = build_runtime(config, LossConfig(), total_steps=2)
    assert [layer.gradient_checkpointing for layer in runtime.model.model.layers] == [True, False]
    assert runtime.trainer.micro_batch_size == 3
