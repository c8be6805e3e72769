"""Config of LoRA training (section ``[trainer.lora]``, or ``[lora]`` of ``rlbus sft``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rlbus.config import ConfigModel
from rlbus.messages import ADAPTER_NAME_PATTERN

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraConfig(ConfigModel):
    """Train a low-rank adapter (PEFT LoRA) instead of the full weights; the base stays frozen."""

    rank: int = Field(8, gt=0)
    """Rank r of the adapter matrices (A: r x in, B: out x r)."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the adapter's update is multiplied by ``alpha / rank``."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input during training."""
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR))
    """Linear layers that get an adapter, as PEFT matches them (a module name's last parts); one
    that matches no layer stops the trainer before training."""
    name: str = Field("rlbus-lora", pattern=ADAPTER_NAME_PATTERN)
    """Name the adapter is served under: env-workers pass it as ``model`` and replicas keep adapters
    by it (letters, digits, ``.``, ``_``, ``-``; no path separators; at most 64 characters)."""
    transfer: Literal["adapter", "merged"] = "adapter"
    """What the trainer sends to inference each step (RL): ``adapter``, only the adapter's tensors,
    which replicas load in place as ``name`` (needs ``inference.enable_lora``, which ``rlbus rl``
    sets); ``merged``, the full weights with the adapter merged in, which replicas load as for full
    training (for engines that cannot serve LoRA)."""

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, targets: list[str]) -> list[str]:
        if not targets or any(not name.strip() for name in targets):
            raise ValueError(f"lora.target_modules must name at least one module and no empty names, got {targets}")
        return targets
