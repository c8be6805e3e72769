"""One optimizer step over a rank's packed micro-batches, with its metrics; no sockets.

Per micro-batch: forward (``memory.micro_batch_size`` packed rows back to back), loss share (normalised by the step's
global loss-token count), backward; then gradient clipping, the learning rate of
this step, AdamW. Under FSDP2 every rank runs the same number of micro-batches
(the orchestrator pads with zero-loss ones), so the collectives line up.
Statistics are summed per rank and reduced once per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlbus.services.trainer.compile import CompileWarmup
from rlbus.services.trainer.config import LossConfig, OptimizerConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.logprobs import RowTensors, concat_rows, row_logprobs, sample_ids, sample_lengths
from rlbus.services.trainer.losses import LossInputs, LossOutput, rl_loss, sft_loss
from rlbus.services.trainer.perf import FlopsModel, peak_memory_gib
from rlbus.services.trainer.schedule import LRSchedule

# Order of the per-step sums reduced over ranks in one all_reduce.
SUM_KEYS = ("loss", "loss_tokens", "entropy", "mismatch_kl", "masked_positive", "masked_negative", "tokens", "flops")


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    # The rate is set before every step from the schedule; lr here is only the initial value.
    # Frozen parameters (a LoRA run's base) stay out: never decayed, no state kept for them.
    trainable = [param for param in model.parameters() if param.requires_grad]
    return torch.optim.AdamW(trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


@dataclass
class StepStats:
    """Per-rank sums of one step (float64 so long runs of small numbers add up exactly enough)."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUM_KEYS, 0.0))
    mismatch_kl_max: float = 0.0

    def add(self, name: str, value: float | Tensor) -> None:
        self.sums[name] += float(value)


class TrainStep:
    """Runs training steps on ``model``; ``loss`` None trains SFT (negative log-likelihood)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                 ctx: DistContext, max_grad_norm: float, loss: LossConfig | None,
                 peak_flops: float, padded_rows: bool = False, micro_batch_size: int = 1,
                 warmup: CompileWarmup | None = None) -> None:  # fmt: skip
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.ctx = ctx
        self.max_grad_norm = max_grad_norm
        self.loss_config = loss
        self.flops_model = FlopsModel.of(model)
        self.peak_flops = peak_flops
        self.padded_rows = padded_rows
        """Run each row as a padded batch of its samples (TrainingConfig.row_layout)."""
        self.micro_batch_size = micro_batch_size
        """Rows per forward/backward (``memory.micro_batch_size``); gradients accumulate over them."""
        self._warmup = warmup
        """The compile warm-up (``trainer.compile``) still running on its thread, if any."""

    def _await_warmup(self) -> None:
        # The warm-up runs the model too: never beside a real step.
        if self._warmup is not None:
            self._warmup.wait()
            self._warmup = None

    def loss_share(self, inputs: LossInputs, num_loss_tokens: int, sft: bool = False) -> LossOutput:
        if sft or self.loss_config is None:
            return sft_loss(inputs, num_loss_tokens)
        return rl_loss(inputs, self.loss_config, num_loss_tokens)

    def run(self, step: int, rows: list[RowTensors], num_loss_tokens: int, sft: bool = False) -> dict[str, float]:
        """Train one step on this rank's ``rows``; returns the step's metrics (same on every rank).
        ``sft``: the negative log-likelihood, whatever ``loss`` (a batch of SFT from a teacher)."""
        self._await_warmup()
        started = time.perf_counter()
        sft = sft or self.loss_config is None
        lr = self.schedule.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        stats = StepStats()
        for first in range(0, len(rows), self.micro_batch_size):
            micro_batch = concat_rows(rows[first : first + self.micro_batch_size])
            self._micro_step(micro_batch, num_loss_tokens, stats, sft)
        forward_backward_s = time.perf_counter() - started
        # Over what this step's optimizer updates: with several runs' adapters on one model
        # (multi_run.py), another run's leftover gradients must not scale this run's clipping.
        trained = [param for group in self.optimizer.param_groups for param in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, self.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.optimizer.step()
        elapsed = time.perf_counter() - started
        metrics = self._reduce(stats, sft)
        metrics.update({"optim/lr": lr, "optim/grad_norm": float(grad_norm),
                        "time/forward_backward": forward_backward_s})  # fmt: skip
        metrics.update(self._perf(metrics.pop("_tokens"), metrics.pop("_flops"), elapsed))
        return metrics

    def _micro_step(self, row: RowTensors, num_loss_tokens: int, stats: StepStats, sft: bool) -> None:
        logprobs, entropy = row_logprobs(self.model, row, self.padded_rows)
        ids = sample_ids(row.position_ids)
        inputs = LossInputs(logprobs=logprobs, inference_logprobs=row.inference_logprobs,
                            advantages=row.advantages, loss_mask=row.loss_mask, sample_ids=ids)  # fmt: skip
        output = self.loss_share(inputs, num_loss_tokens, sft)
        # FSDP2 averages gradients over ranks; the shares must be summed (see shard_model).
        (output.loss * self.ctx.world_size).backward()
        mask = row.loss_mask
        stats.add("loss", output.loss.detach())
        stats.add("loss_tokens", mask.sum())
        stats.add("entropy", entropy[mask].sum())
        stats.add("masked_positive", output.masked_positive)
        stats.add("masked_negative", output.masked_negative)
        stats.add("tokens", row.num_tokens)
        stats.add("flops", self.flops_model.training_flops(sample_lengths(row.position_ids).tolist()))
        if not sft:
            self._add_mismatch(logprobs.detach(), inputs, stats)

    def _add_mismatch(self, logprobs: Tensor, inputs: LossInputs, stats: StepStats) -> None:
        # k3 estimator of KL(sampler || trainer) per token: r - log r - 1 >= 0.
        mask = inputs.loss_mask
        log_ratio = torch.where(mask, logprobs - inputs.inference_logprobs, torch.zeros_like(logprobs))
        # float64: in float32, exp(d) - d - 1 cancels to exactly 0 for |d| below ~1e-4,
        # which would hide the small trainer/inference mismatch this metric exists to show.
        log_ratio = log_ratio.double()
        kl = torch.exp(log_ratio) - log_ratio - 1
        stats.add("mismatch_kl", kl.sum())
        counts = torch.bincount(inputs.sample_ids, weights=mask.double())
        per_sample = torch.bincount(inputs.sample_ids, weights=kl.double()) / counts.clamp(min=1)
        stats.mismatch_kl_max = max(stats.mismatch_kl_max, float(per_sample.max()) if per_sample.numel() else 0.0)

    def _reduce(self, stats: StepStats, sft: bool) -> dict[str, float]:
        sums = torch.tensor([stats.sums[k] for k in SUM_KEYS], dtype=torch.float64, device=self.ctx.device)
        self.ctx.all_reduce(sums, "sum")
        kl_max = self.ctx.all_reduce(torch.tensor([stats.mismatch_kl_max], device=self.ctx.device), "max")
        total = dict(zip(SUM_KEYS, sums.tolist(), strict=True))
        loss_tokens = max(total["loss_tokens"], 1.0)
        metrics = {
            "loss/mean": total["loss"],
            "entropy/mean": total["entropy"] / loss_tokens,
            "progress/loss_tokens": total["loss_tokens"],
            "_tokens": total["tokens"],
            "_flops": total["flops"],
        }
        if not sft:
            metrics.update({
                "mismatch_kl/mean": total["mismatch_kl"] / loss_tokens,
                "mismatch_kl/max": float(kl_max.item()),
                "masked_advantage_positive/mean": total["masked_positive"] / loss_tokens,
                "masked_advantage_negative/mean": total["masked_negative"] / loss_tokens,
            })  # fmt: skip
        return metrics

    def _perf(self, tokens: float, flops: float, elapsed: float) -> dict[str, float]:
        throughput = tokens / elapsed
        return {
            "perf/throughput": throughput,
            "perf/throughput_per_gpu": throughput / self.ctx.world_size,
            "perf/mfu": flops / (elapsed * self.peak_flops * self.ctx.world_size),
            "perf/peak_memory": peak_memory_gib(self.ctx.device),
            "progress/tokens": tokens,
        }

    @torch.no_grad()
    def evaluate(self, rows: list[RowTensors], num_loss_tokens: int) -> float:
        """Mean loss over ``rows`` of every rank without training (SFT validation)."""
        self._await_warmup()
        total = torch.zeros(1, dtype=torch.float64, device=self.ctx.device)
        for row in rows:
            logprobs, _ = row_logprobs(self.model, row, self.padded_rows)
            inputs = LossInputs(logprobs=logprobs, inference_logprobs=row.inference_logprobs,
                                advantages=row.advantages, loss_mask=row.loss_mask,
                                sample_ids=sample_ids(row.position_ids))  # fmt: skip
            total += self.loss_share(inputs, num_loss_tokens).loss.double()
        return float(self.ctx.all_reduce(total, "sum").item())
