"""Learning rate as a pure function of the step: warmup, then constant, linear or cosine.

The schedule holds no state beyond its config, so a resumed run gets the same
rate from the step number alone, and the optimizer's rate is set before every
step instead of being advanced by a stateful scheduler.
"""

from __future__ import annotations

import math

from rlbus.services.trainer.config import SchedulerConfig


class LRSchedule:
    """``lr(step)``: the rate of optimizer step ``step`` (1 is the first step)."""

    def __init__(self, peak_lr: float, config: SchedulerConfig, max_steps: int | None) -> None:
        if config.type != "constant" and max_steps is None:
            raise ValueError(f"scheduler.type = {config.type!r} decays towards max_steps, but max_steps is not set")
        if max_steps is not None and config.warmup_steps > max_steps:
            raise ValueError(f"scheduler.warmup_steps = {config.warmup_steps} exceeds max_steps = {max_steps}")
        self.peak_lr = peak_lr
        self.config = config
        self.max_steps = max_steps

    def factor(self, step: int) -> float:
        """Fraction of the peak rate at ``step``."""
        warmup = self.config.warmup_steps
        if step <= warmup:
            return step / warmup if warmup else 1.0
        if self.config.type == "constant":
            return 1.0
        assert self.max_steps is not None
        progress = min(1.0, (step - warmup) / max(1, self.max_steps - warmup))
        floor = self.config.min_lr_ratio
        if self.config.type == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr(self, step: int) -> float:
        return self.peak_lr * self.factor(step)
