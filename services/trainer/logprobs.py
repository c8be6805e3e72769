"""Trainer logprobs of packed rows, with each token's sampling temperature.

A packed row holds several samples back to back; ``position_ids`` restart at 0
where a new sample begins. Called without an attention mask and without a KV
cache, transformers (>= 4.56) derives a block-diagonal causal mask from such
position ids for sdpa and eager attention, and flash-attention uses them as
sequence boundaries, so no token attends across samples (tests check that a
packed row gives the logprobs of its samples run one by one).

With ``padded=True`` a row runs as a padded batch of its samples instead
([S, longest sample], right-padded, with an attention mask) and the logits are
put back in row order: the same numbers (to float rounding), but attention
costs the sum of each sample's length squared rather than the row's length
squared, and no block-diagonal mask is built. On CPU (sdpa) that made a
quickstart step's forward/backward 1.4-1.6x faster; flash-attention's varlen
kernel already skips the cross-sample work, so packed rows stay packed there.

Alignment: the logprob of token ``i`` comes from the logits at ``i - 1``, divided
by token ``i``'s temperature, as the sampler did. Token 0 of a row (and, in
effect, the first token of every sample) has no prediction: its logprob is 0 and
it must never be a loss token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rlbus.messages import MicroBatch


@dataclass
class RowTensors:
    """One packed micro-batch as tensors on the training device, each [L]."""

    input_ids: Tensor
    """int64 token ids."""
    position_ids: Tensor
    """int64 position within each sample."""
    loss_mask: Tensor
    """bool."""
    advantages: Tensor
    """float32."""
    inference_logprobs: Tensor
    """float32."""
    temperatures: Tensor
    """float32; positive wherever ``loss_mask`` is set."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @classmethod
    def from_message(cls, micro: MicroBatch, device: torch.device) -> RowTensors:
        def tensor(array: np.ndarray, dtype: torch.dtype) -> Tensor:
            # The arrays view read-only zmq frames; torch wants writable memory.
            return torch.tensor(np.asarray(array), dtype=dtype, device=device)

        return cls(
            input_ids=tensor(micro.input_ids, torch.int64),
            position_ids=tensor(micro.position_ids, torch.int64),
            loss_mask=tensor(micro.loss_mask, torch.bool),
            advantages=tensor(micro.advantages, torch.float32),
            inference_logprobs=tensor(micro.inference_logprobs, torch.float32),
            temperatures=tensor(micro.temperatures, torch.float32),
        )


def concat_rows(rows: list[RowTensors]) -> RowTensors:
    """``rows`` back to back as one row (``memory.micro_batch_size``): each row starts a new sample
    (its positions restart at 0), so no token attends across rows and every per-token number is the
    one the rows give alone."""
    if len(rows) == 1:
        return rows[0]
    fields = ("input_ids", "position_ids", "loss_mask", "advantages", "inference_logprobs", "temperatures")
    return RowTensors(**{name: torch.cat([getattr(row, name) for row in rows]) for name in fields})


def row_from_arrays(input_ids: np.ndarray, position_ids: np.ndarray, loss_mask: np.ndarray,
                    device: torch.device) -> RowTensors:  # fmt: skip
    """A row without RL fields (SFT): advantages and sampling logprobs 0, temperature 1."""
    length = len(input_ids)
    zeros = np.zeros(length, np.float32)
    micro = MicroBatch(input_ids=input_ids, position_ids=position_ids, loss_mask=loss_mask, advantages=zeros,
                       inference_logprobs=zeros, temperatures=np.ones(length, np.float32))  # fmt: skip
    return RowTensors.from_message(micro, device)


def sample_ids(position_ids: Tensor) -> Tensor:
    """[L] index of the sample each token belongs to: a new sample starts wherever a
    position does not follow its predecessor (the rule transformers uses for its mask)."""
    steps = torch.diff(position_ids, prepend=position_ids[:1] - 1)
    return (steps != 1).cumsum(0)


def sample_lengths(position_ids: Tensor) -> Tensor:
    """[S] number of tokens of each packed sample."""
    return torch.bincount(sample_ids(position_ids))


def row_logits(model: torch.nn.Module, row: RowTensors, padded: bool = False) -> Tensor:
    """[L, V] logits of every token of ``row`` (each token predicting the next)."""
    if not padded:
        return model(input_ids=row.input_ids[None], position_ids=row.position_ids[None], use_cache=False).logits[0]
    lengths = sample_lengths(row.position_ids)
    # [S, longest]: True where sample s has a token; row-major order is the row's own order.
    present = torch.arange(int(lengths.max()), device=lengths.device)[None, :] < lengths[:, None]
    input_ids = row.input_ids.new_zeros(present.shape)
    input_ids[present] = row.input_ids
    position_ids = torch.arange(present.shape[1], device=lengths.device)[None, :].expand(present.shape)
    output = model(input_ids=input_ids, attention_mask=present.long(), position_ids=position_ids, use_cache=False)
    return output.logits[present]


def row_logprobs(model: torch.nn.Module, row: RowTensors, padded: bool = False) -> tuple[Tensor, Tensor]:
    """Trainer logprob [L] (with grad) and entropy [L] (no grad) of every token of ``row``;
    ``padded`` runs the row's samples as a padded batch (see the module docstring)."""
    # [L-1, V]: the logits at i-1 predict token i; computed in float32 whatever the model dtype.
    logits = row_logits(model, row, padded)[:-1].float()
    temperatures = torch.where(row.loss_mask, row.temperatures, torch.ones_like(row.temperatures))
    logits = logits / temperatures[1:, None]
    logprobs_all = torch.log_softmax(logits, dim=-1)
    token_logprobs = logprobs_all.gather(-1, row.input_ids[1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)
    zero = token_logprobs.new_zeros(1)
    return torch.cat([zero, token_logprobs]), torch.cat([zero.detach(), entropy])
