"""RL objectives over packed tokens, selected by ``loss.type``.

Every objective works on the flat per-token tensors of one micro-batch (a packed
row of L tokens, several samples told apart by ``sample_ids``) and returns this
micro-batch's share of the step's loss: the sum over its loss tokens divided by
``num_loss_tokens``, the loss-token count of the whole step over all micro-batches
and ranks. Summing the shares (and the gradients over ranks) gives the step's
per-token mean, whatever the packing, so every token weighs the same.

Notation (per token): ``logp`` trainer logprob (carries the gradient), ``logq``
inference (sampling) logprob, ``A`` advantage, ``log_ratio = logp - logq``,
``r = exp(log_ratio)``. Every objective adds ``kl_coef * log_ratio**2``, a small
pull of the trainer towards the sampler that keeps their mismatch small.

* ``masked_is`` (default): ``-keep * A * r``; a token is dropped (keep = 0) when
  its probability already moved more than ``mask_threshold`` in the direction the
  advantage pushes it (A > 0 and p - q > t, or A < 0 and p - q < -t).
* ``ppo``: ``-min(r * A, clip(r, 1 - eps, 1 + eps) * A)``.
* ``gspo``: like ppo with one ratio per sample, ``exp(mean log_ratio over its
  loss tokens)``, shared by all of its tokens (so a sample weighs by its length).
* ``cispo``: ``-sg(min(r, 1 + eps)) * A * logp``: the IS weight is clipped and
  stop-gradient, so no token ever loses its gradient (no lower clip, as in MiniMax-M1).
* ``pg``: ``-A * logp``, plain on-policy policy gradient.

``masked_positive`` / ``masked_negative`` count loss tokens with A > 0 / A < 0
that the trust region excluded (masked_is: masked; ppo/gspo: clipped, so without
gradient; cispo: weight clipped; pg: none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlbus.services.trainer.config import LossConfig


@dataclass
class LossInputs:
    """Per-token tensors of one micro-batch, all of shape [L]."""

    logprobs: Tensor
    """Trainer logprob of each token (requires grad)."""
    inference_logprobs: Tensor
    """Sampling logprob of each token."""
    advantages: Tensor
    loss_mask: Tensor
    """bool: tokens the loss is taken over."""
    sample_ids: Tensor
    """int64: index of the packed sample each token belongs to (0, 0, 1, 1, 1, 2, ...)."""


@dataclass
class LossOutput:
    loss: Tensor
    """Scalar: this micro-batch's share of the step's mean loss."""
    masked_positive: Tensor
    """Scalar count of loss tokens with A > 0 excluded by the trust region."""
    masked_negative: Tensor


@dataclass
class TokenTerms:
    """What an objective computes per token before masking and normalising."""

    loss: Tensor
    """[L] per-token loss without the KL penalty."""
    excluded: Tensor
    """[L] bool: the trust region excluded (masked or clipped) this token."""


Objective = Callable[[LossInputs, Tensor, LossConfig], TokenTerms]


def masked_is(inputs: LossInputs, log_ratio: Tensor, config: LossConfig) -> TokenTerms:
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        prob_diff = torch.exp(inputs.logprobs) - torch.exp(inputs.inference_logprobs)
        advantages = inputs.advantages
        excluded = ((advantages > 0) & (prob_diff > config.mask_threshold)) | (
            (advantages < 0) & (prob_diff < -config.mask_threshold)
        )
    keep = (~excluded).to(ratio.dtype)
    return TokenTerms(loss=-keep * advantages * ratio, excluded=excluded)


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, eps: float) -> TokenTerms:
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    with torch.no_grad():
        excluded = ((advantages > 0) & (ratio > 1 + eps)) | ((advantages < 0) & (ratio < 1 - eps))
    return TokenTerms(loss=loss, excluded=excluded)


def ppo(inputs: LossInputs, log_ratio: Tensor, config: LossConfig) -> TokenTerms:
    return _clipped_surrogate(torch.exp(log_ratio), inputs.advantages, config.clip_eps)


def gspo(inputs: LossInputs, log_ratio: Tensor, config: LossConfig) -> TokenTerms:
    mask = inputs.loss_mask.to(log_ratio.dtype)
    num_samples = int(inputs.sample_ids.max()) + 1 if inputs.sample_ids.numel() else 0
    # Mean log-ratio over each sample's loss tokens: [S]; samples without loss tokens get 0.
    zeros = log_ratio.new_zeros(num_samples)
    summed = zeros.index_add(0, inputs.sample_ids, log_ratio * mask)
    counts = zeros.index_add(0, inputs.sample_ids, mask)
    sequence_ratio = torch.exp(summed / counts.clamp(min=1))[inputs.sample_ids]  # [L]
    return _clipped_surrogate(sequence_ratio, inputs.advantages, config.clip_eps)


def cispo(inputs: LossInputs, log_ratio: Tensor, config: LossConfig) -> TokenTerms:
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        weight = torch.clamp(ratio, max=1 + config.clip_eps)
        excluded = (ratio > 1 + config.clip_eps) & (inputs.advantages != 0)
    return TokenTerms(loss=-weight * inputs.advantages * inputs.logprobs, excluded=excluded)


def pg(inputs: LossInputs, log_ratio: Tensor, config: LossConfig) -> TokenTerms:
    return TokenTerms(loss=-inputs.advantages * inputs.logprobs, excluded=torch.zeros_like(inputs.loss_mask))


OBJECTIVES: dict[str, Objective] = {"masked_is": masked_is, "ppo": ppo, "gspo": gspo, "cispo": cispo, "pg": pg}


def rl_loss(inputs: LossInputs, config: LossConfig, num_loss_tokens: int) -> LossOutput:
    """This micro-batch's share of the step's loss under ``config.type``."""
    log_ratio = inputs.logprobs - inputs.inference_logprobs
    # Tokens outside the mask may hold anything (prompt logprobs are 0): keep them
    # out of exp() so a huge value there cannot turn the masked sum into NaN.
    log_ratio = torch.where(inputs.loss_mask, log_ratio, torch.zeros_like(log_ratio))
    terms = OBJECTIVES[config.type](inputs, log_ratio, config)
    per_token = terms.loss + config.kl_coef * log_ratio**2
    mask = inputs.loss_mask
    loss = torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / max(num_loss_tokens, 1)
    excluded = terms.excluded & mask
    return LossOutput(
        loss=loss,
        masked_positive=(excluded & (inputs.advantages > 0)).sum(),
        masked_negative=(excluded & (inputs.advantages < 0)).sum(),
    )


def sft_loss(inputs: LossInputs, num_loss_tokens: int) -> LossOutput:
    """Negative log-likelihood of the loss tokens, normalised like the RL losses."""
    nll = torch.where(inputs.loss_mask, -inputs.logprobs, torch.zeros_like(inputs.logprobs))
    zero = torch.zeros((), dtype=torch.int64, device=nll.device)
    return LossOutput(loss=nll.sum() / max(num_loss_tokens, 1), masked_positive=zero, masked_negative=zero)
