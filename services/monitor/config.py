"""Config of the monitor (``rlbus monitor``, section ``[monitor]``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from common.config import ConfigModel, ServiceConfig


class WandbConfig(ConfigModel):
    """Weights & Biases logging: one run for the whole job."""

    enabled: bool = False
    """Log to W&B at all."""
    project: str = "rlbus"
    """W&B project."""
    name: str | None = None
    """Run name; None lets W&B choose."""
    mode: Literal["online", "offline", "disabled"] = "offline"
    """online needs a network and an API key; offline writes under output_dir/wandb."""
    samples_interval: int = Field(10, ge=1)
    """Log a table of rollout samples every this many steps."""


class MonitorConfig(ServiceConfig):
    """Collects telemetry from every service and shows it."""

    SERVICE: ClassVar[str] = "monitor"

    console: bool = True
    """Print a compact summary per step."""
    dead_after_s: float = Field(30.0, gt=0)
    """A service without heartbeat for this long is reported dead."""
    view_api_key: str | None = None
    """Key ``rlbus tail`` must present; None leaves the live view open."""
    wandb: WandbConfig = WandbConfig()
    """W&B settings."""
