"""The trainer's side of the teacher modes: opd's advantages through the RL loss minimise the reverse
KL to the teacher (the sign is right); an ``sft`` batch trains with the negative log-likelihood."""

import numpy as np
import pytest
import torch

from rlbus.messages import Rollout, Turn
from rlbus.services.orchestrator.distill import TeacherTally, opd_sample
from rlbus.services.trainer.config import LossConfig
from rlbus.services.trainer.logprobs import row_logprobs
from rlbus.services.trainer.losses import LossInputs, rl_loss
from rlbus.services.trainer.runtime import build_runtime
from tests.unit.trainer.test_train_step import config, rows

VOCAB, TOKENS = 8, 64


def opd_inputs(logits: torch.Tensor, teacher: torch.Tensor, generator: torch.Generator) -> LossInputs:
    """One on-policy sample of the student ``logits`` and its opd advantages, as the orchestrator makes them."""
    student = torch.log_softmax(logits.detach(), -1)
    tokens = torch.multinomial(student.exp(), TOKENS, replacement=True, generator=generator)
    turn = Turn(prompt_ids=[0], completion_ids=tokens.tolist(), completion_logprobs=student[tokens].tolist(),
                completion_mask=[True] * TOKENS, policy_step=0, teacher_logprobs=teacher[tokens].tolist())  # fmt: skip
    sample = opd_sample(Rollout(rollout_id="r", turns=[turn], reward=0.0), 0.0, 0.0, 1.0, TeacherTally())
    assert sample.token_advantages is not None
    return LossInputs(logprobs=torch.log_softmax(logits, -1)[tokens], inference_logprobs=student[tokens],
                      advantages=torch.from_numpy(sample.token_advantages[1:]).double(),
                      loss_mask=torch.ones(TOKENS, dtype=torch.bool),
                      sample_ids=torch.zeros(TOKENS, dtype=torch.long))  # fmt: skip


def reverse_kl(logits: torch.Tensor, teacher: torch.Tensor) -> float:
    student = torch.log_softmax(logits.detach(), -1)
    return float((student.exp() * (student - teacher)).sum())


def test_opd_advantages_through_the_rl_loss_lower_the_reverse_kl_to_the_teacher():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(2 * torch.randn(VOCAB, generator=generator, dtype=torch.float64), -1)
    logits = torch.zeros(VOCAB, dtype=torch.float64, requires_grad=True)  # a uniform student
    optimizer = torch.optim.SGD([logits], lr=0.5)
    before = reverse_kl(logits, teacher)
    for _ in range(60):
        optimizer.zero_grad()
        rl_loss(opd_inputs(logits, teacher, generator), LossConfig(), TOKENS).loss.backward()
        optimizer.step()
    # Measured: 1.83 nats -> 0.02 (with the sign flipped: -> 7.8): the student moved onto the teacher.
    assert reverse_kl(logits, teacher) < 0.1 * before, (before, reverse_kl(logits, teacher))


def test_a_token_the_teacher_prefers_gains_probability():
    logits = torch.zeros(VOCAB, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[[3, 5]]
    # Token 3: the teacher says -0.5 where the student sampled it at -2.08 (A > 0); token 5 the reverse.
    advantages = torch.tensor([-0.5 - logp[0].item(), -4.0 - logp[1].item()], dtype=torch.float64)
    inputs = LossInputs(logprobs=logp, inference_logprobs=logp.detach(), advantages=advantages,
                        loss_mask=torch.ones(2, dtype=torch.bool), sample_ids=torch.zeros(2, dtype=torch.long))  # fmt: skip
    rl_loss(inputs, LossConfig(), 2).loss.backward()
    assert logits.grad is not None and logits.grad[3] < 0 < logits.grad[5]  # descent raises 3, lowers 5


def test_an_sft_batch_trains_with_the_nll_whatever_the_rl_loss(tiny_model_dir, tmp_path):
    runtime = build_runtime(config(tiny_model_dir, tmp_path), LossConfig(), total_steps=6)
    batch_rows, num_loss_tokens = rows(1)
    with torch.no_grad():
        nll = -sum(float(row_logprobs(runtime.model, row)[0][row.loss_mask].sum()) for row in batch_rows)
    metrics = runtime.trainer.run(1, batch_rows, num_loss_tokens, sft=True)
    assert metrics["loss/mean"] == pytest.approx(nll / num_loss_tokens, rel=1e-5)
    assert "mismatch_kl/mean" not in metrics  # made-up sampling logprobs of a teacher are not compared
    assert np.isfinite(metrics["optim/grad_norm"]) and metrics["optim/grad_norm"] > 0
