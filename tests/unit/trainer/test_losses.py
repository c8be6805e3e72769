"""Each objective against values worked out by hand, masking and clipping included."""

import math

import pytest
import torch

from rlbus.services.trainer.config import LossConfig
from rlbus.services.trainer.losses import LossInputs, rl_loss, sft_loss

LN = math.log


def inputs(p, q, advantages, mask, samples=None) -> LossInputs:
    """Tokens with trainer probability ``p`` and sampling probability ``q``."""
    logprobs = torch.tensor([LN(x) for x in p], dtype=torch.float64, requires_grad=True)
    return LossInputs(
        logprobs=logprobs,
        inference_logprobs=torch.tensor([LN(x) for x in q], dtype=torch.float64),
        advantages=torch.tensor(advantages, dtype=torch.float64),
        loss_mask=torch.tensor(mask),
        sample_ids=torch.tensor(samples or [0] * len(p)),
    )


def loss_and_grad(x: LossInputs, config: LossConfig, num_loss_tokens: int):
    out = rl_loss(x, config, num_loss_tokens)
    out.loss.backward()
    return out, x.logprobs.grad.tolist()


# Token 0 starts the sample (not a loss token). Tokens 1-4:
#   t1: p .5 q .25 -> r 2,    dp +.25, A +1 -> masked (moved up by more than .2 already)
#   t2: p .5 q .4  -> r 1.25, dp +.10, A +1 -> kept:   -1 * 1.25
#   t3: p .1 q .4  -> r .25,  dp -.30, A -1 -> masked
#   t4: p .1 q .2  -> r .5,   dp -.10, A -2 -> kept:   +2 * .5 = 1
MASKED_IS = {"p": [0.3, 0.5, 0.5, 0.1, 0.1], "q": [0.9, 0.25, 0.4, 0.4, 0.2], "advantages": [5.0, 1, 1, -1, -2],
             "mask": [False, True, True, True, True]}  # fmt: skip


def test_masked_is_by_hand():
    kl = 1e-3
    out, grad = loss_and_grad(inputs(**MASKED_IS), LossConfig(kl_coef=kl), num_loss_tokens=8)
    penalty = kl * (LN(2) ** 2 + LN(1.25) ** 2 + LN(0.25) ** 2 + LN(0.5) ** 2)
    assert out.loss.item() == pytest.approx((-1.25 + 1.0 + penalty) / 8, rel=1e-12)
    # d(-A r)/dlogp = -A r; d(kl lr^2)/dlogp = 2 kl lr. Masked tokens keep only the penalty.
    expected = [0.0, 2 * kl * LN(2) / 8, (-1.25 + 2 * kl * LN(1.25)) / 8, 2 * kl * LN(0.25) / 8,
                (1.0 + 2 * kl * LN(0.5)) / 8]  # fmt: skip
    assert grad == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert (out.masked_positive.item(), out.masked_negative.item()) == (1, 1)


def test_masked_is_threshold_is_configurable():
    out = rl_loss(inputs(**MASKED_IS), LossConfig(mask_threshold=0.5, kl_coef=0), num_loss_tokens=4)
    # Nothing moved by more than .5: all four tokens count, -2 - 1.25 + .25 + 1.
    assert out.loss.item() == pytest.approx((-2 - 1.25 + 0.25 + 1.0) / 4)
    assert (out.masked_positive.item(), out.masked_negative.item()) == (0, 0)


def test_ppo_clips_ratio_by_hand():
    # t1: r 2 A +1 -> min(2, 1.2) = 1.2 clipped (no gradient); t2: r 1.1 A +1 -> 1.1;
    # t3: r .5 A -1 -> min(-.5, -.8) = -.8 clipped; t4: r .9 A -1 -> -.9.
    x = inputs(p=[0.5, 0.5, 0.55, 0.2, 0.45], q=[0.5, 0.25, 0.5, 0.4, 0.5], advantages=[0.0, 1, 1, -1, -1],
               mask=[False, True, True, True, True])  # fmt: skip
    out, grad = loss_and_grad(x, LossConfig(type="ppo", clip_eps=0.2, kl_coef=0), num_loss_tokens=4)
    assert out.loss.item() == pytest.approx((-1.2 - 1.1 + 0.8 + 0.9) / 4)
    assert grad == pytest.approx([0.0, 0.0, -1.1 / 4, 0.0, 0.9 / 4])
    assert (out.masked_positive.item(), out.masked_negative.item()) == (1, 1)


def test_gspo_uses_one_ratio_per_sample():
    # Sample 0 = tokens 0-2 (loss on 1, 2: log-ratios ln 1.1 and 0 -> s = sqrt(1.1)), A = +1.
    # Sample 1 = tokens 3-4 (loss on 4: ratio 2 -> clipped at 1.2), A = +1.
    x = inputs(p=[0.5, 0.55, 0.3, 0.5, 0.4], q=[0.5, 0.5, 0.3, 0.5, 0.2], advantages=[1.0, 1, 1, 1, 1],
               mask=[False, True, True, False, True], samples=[0, 0, 0, 1, 1])  # fmt: skip
    out, grad = loss_and_grad(x, LossConfig(type="gspo", clip_eps=0.2, kl_coef=0), num_loss_tokens=3)
    s = math.sqrt(1.1)
    assert out.loss.item() == pytest.approx((-2 * s - 1.2) / 3)
    # Each of sample 0's two tokens carries -s; d(-2s)/dlogp_t = -2 s * 1/2 = -s.
    assert grad == pytest.approx([0.0, -s / 3, -s / 3, 0.0, 0.0])
    assert out.masked_positive.item() == 1


def test_cispo_clips_the_stop_gradient_weight():
    # t1: r 2 -> weight 1.2, A +1; t2: r .5 -> weight .5 (no lower clip), A -1.
    x = inputs(p=[0.5, 0.5, 0.1], q=[0.5, 0.25, 0.2], advantages=[0.0, 1, -1], mask=[False, True, True])
    out, grad = loss_and_grad(x, LossConfig(type="cispo", clip_eps=0.2, kl_coef=0), num_loss_tokens=2)
    assert out.loss.item() == pytest.approx((-1.2 * LN(0.5) + 0.5 * LN(0.1)) / 2)
    assert grad == pytest.approx([0.0, -1.2 / 2, 0.5 / 2])
    assert (out.masked_positive.item(), out.masked_negative.item()) == (1, 0)


def test_pg_is_advantage_weighted_log_likelihood():
    x = inputs(p=[0.5, 0.5, 0.1], q=[0.5, 0.25, 0.2], advantages=[3.0, 2, -1], mask=[False, True, True])
    out, grad = loss_and_grad(x, LossConfig(type="pg", kl_coef=0), num_loss_tokens=2)
    assert out.loss.item() == pytest.approx((-2 * LN(0.5) + LN(0.1)) / 2)
    assert grad == pytest.approx([0.0, -1.0, 0.5])


@pytest.mark.parametrize("loss_type", ["masked_is", "ppo", "gspo", "cispo", "pg"])
def test_micro_batch_shares_add_up_to_the_step_mean(loss_type):
    torch.manual_seed(0)
    p = (torch.rand(10) * 0.9 + 0.05).tolist()
    q = (torch.rand(10) * 0.9 + 0.05).tolist()
    advantages = torch.randn(10).tolist()
    mask = [i % 5 != 0 for i in range(10)]
    samples = [i // 5 for i in range(10)]
    config = LossConfig(type=loss_type)
    whole = rl_loss(inputs(p, q, advantages, mask, samples), config, num_loss_tokens=8).loss
    halves = [rl_loss(inputs(p[s], q[s], advantages[s], mask[s], [0] * 5), config, num_loss_tokens=8).loss
              for s in (slice(0, 5), slice(5, 10))]  # fmt: skip
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item(), rel=1e-12)


def test_tokens_outside_the_mask_cannot_poison_the_loss():
    x = inputs(p=[0.5, 0.5], q=[0.5, 0.25], advantages=[1.0, 1.0], mask=[False, True])
    x.inference_logprobs[0] = float("-inf")  # e.g. a prompt token the sampler never scored
    out, grad = loss_and_grad(x, LossConfig(type="ppo"), num_loss_tokens=1)
    assert math.isfinite(out.loss.item()) and all(math.isfinite(g) for g in grad)


def test_sft_loss_is_mean_nll_of_loss_tokens():
    x = inputs(p=[0.5, 0.25, 0.5], q=[1, 1, 1], advantages=[0.0, 0, 0], mask=[False, True, True])
    out = sft_loss(x, num_loss_tokens=2)
    assert out.loss.item() == pytest.approx((LN(4) + LN(2)) / 2)
