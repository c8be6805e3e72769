"""Configs of the monitor (``rlbus monitor``, section ``[monitor]``) and of ``rlbus tail``."""

from __future__ import annotations

import re
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from rlbus.config import BusConfig, ConfigModel, ServiceConfig
from rlbus.config.base import Secret
from rlbus.curve import is_loopback_host

DEFAULT_SUMMARY_METRICS = [
    "reward/all/mean", "loss/mean", "entropy/mean", "mismatch_kl/mean", "off_policy/mean",
    "perf/throughput", "time/step",
]  # fmt: skip


class WandbConfig(ConfigModel):
    """Weights & Biases logging: one run for the whole job, written by the monitor alone."""

    enabled: bool = False
    """Log to W&B at all (needs the ``monitor`` extra: ``pip install 'rlbus[monitor]'``)."""
    project: str = "rlbus"
    """W&B project."""
    entity: str | None = None
    """W&B team or user the run belongs to; None uses the API key's default entity."""
    name: str | None = None
    """Run name; None lets W&B choose."""
    api_key: Secret | None = None
    """W&B API key for online mode; None leaves it to wandb (``WANDB_API_KEY``, ``wandb login``).
    ``rlbus rl`` also reads it from ``WANDB_API_KEY`` and ``--wandb-api-key``; written redacted."""
    mode: Literal["online", "offline", "disabled"] | None = None
    """online needs a network and an API key; offline writes under ``<output_dir>/wandb``;
    None follows the ``WANDB_MODE`` environment variable, offline when it is unset."""
    samples_interval: int = Field(10, ge=1)
    """Log a table of rollout samples at most once per this many steps."""


DEFAULT_DASHBOARD = "127.0.0.1:8750"


def dashboard_address(value: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` (``[::1]:8750`` for IPv6); None for ``""`` (no dashboard)."""
    if not value.strip():
        return None
    host, sep, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not host:port, e.g. {DEFAULT_DASHBOARD!r} ('' turns the dashboard off)")
    return host, int(port)


DEFAULT_PLATFORM_URL = "https://api.primeintellect.ai"
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""What a platform run id may look like: it becomes part of a URL path."""


class PrimePlatformConfig(ConfigModel):
    """Streaming the run to the Prime platform's dashboard (docs/platform.md). The API key is never a
    config value: it comes from ``PRIME_API_KEY``, else ``api_key`` in ``~/.prime/config.json``."""

    run_name: str | None = None
    """Run name on the dashboard; None: the W&B run name when set."""
    base_url: str = DEFAULT_PLATFORM_URL
    """The platform's API origin: requests go to ``<base_url>/api/v1/rft/...``."""
    team_id: str | None = None
    """Team of the run; None: ``PRIME_TEAM_ID``, then ``team_id`` of ``~/.prime/config.json``."""
    run_id: str | None = None
    """Run to stream into; None registers one (``rlbus rl`` does before anything starts, and sets it
    in the monitor's resolved config; a monitor started alone does at its first start)."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"{value!r} is not an http(s) URL of the platform, e.g. {DEFAULT_PLATFORM_URL!r}")
        return value.rstrip("/")

    @field_validator("run_id")
    @classmethod
    def _url_safe(cls, value: str | None) -> str | None:
        if value is not None and not RUN_ID_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a platform run id (letters, digits and ._:- only)")
        return value


class MonitorConfig(ServiceConfig):
    """Collects telemetry from every service: metrics.jsonl, samples.jsonl, events.jsonl,
    a console summary per step, service health, W&B, and the live view of ``rlbus tail``."""

    SERVICE: ClassVar[str] = "monitor"

    console: bool = True
    """Print a compact summary per step."""
    summary_metrics: list[str] = DEFAULT_SUMMARY_METRICS
    """Metrics shown in the console summary and first in ``rlbus tail``, when reported."""
    step_reporters: list[str] = ["orchestrator", "trainer"]
    """Services whose reports complete a step: its summary (and W&B row) is written once
    each of them reported it, or once any service is ``max_summary_lag_steps`` further."""
    max_summary_lag_steps: int = Field(4, ge=1)
    """A step is summarised without its missing reports once a service reports this many steps
    later; keep it above ``orchestrator.max_async_level`` + 1, or the trainer's reports come late."""
    dead_after_s: float = Field(30.0, gt=0)
    """A service without heartbeat for this long is reported dead."""
    stalled_after_s: float = Field(60.0, gt=0)
    """A service that reports waiting on the same thing for this long is warned about."""
    progress_stalled_after_s: float = Field(600.0, gt=0)
    """A step reporter (``step_reporters``) that keeps heartbeating while its step has not advanced
    for this long is reported STALLED (an error event; ``stalled`` in ``rlbus tail``)."""
    view_log_lines: int = Field(1000, ge=1)
    """Log lines (events, notices, summaries) kept for ``rlbus tail``."""
    view_api_key: Secret | None = None
    """Key ``rlbus tail`` must present; None leaves the live view open. Written redacted in resolved
    configs: ``rlbus tail`` then takes it from ``--api-key`` or ``RLBUS_MONITOR__VIEW_API_KEY``."""
    dashboard: str = DEFAULT_DASHBOARD
    """Where the live dashboard, a web page of the run (charts, health, events, samples), listens:
    ``host:port``; port 0 picks a free one (logged); ``""`` turns it off. A non-loopback host (e.g.
    ``0.0.0.0:8750``) needs ``view_api_key``, which pages then give as ``/?key=<key>``."""
    wandb: WandbConfig = WandbConfig()
    """W&B settings."""
    prime_platform: PrimePlatformConfig | None = None
    """Stream metrics and samples to the Prime platform (docs/platform.md); None: off. ``rlbus rl``
    takes it as the top-level ``[prime_platform]``."""

    @field_validator("dashboard")
    @classmethod
    def _host_port(cls, value: str) -> str:
        dashboard_address(value)
        return value.strip()

    @model_validator(mode="after")
    def _refuse_open_remote_dashboard(self) -> MonitorConfig:
        # The loopback rule of the bus (rlbus.curve.check_bind_allowed), for the dashboard's HTTP server.
        address = dashboard_address(self.dashboard)
        if address is not None and self.view_api_key is None and not is_loopback_host(address[0]):
            raise ValueError(
                f"refusing to serve the dashboard on {self.dashboard!r} without a key: a non-loopback host "
                "needs monitor.view_api_key (or RLBUS_MONITOR__VIEW_API_KEY), or keep it on 127.0.0.1"
            )
        return self


class TailConfig(ConfigModel):
    """``rlbus tail``: live view of a running job from any host that reaches the monitor.

    Reads ``bus`` and ``view_api_key`` (top level or ``[monitor]``) from any rlbus
    config file given with ``@`` and ignores the rest, so
    ``rlbus tail @ outputs/run/configs/rl.toml`` works as it is.
    """

    bus: BusConfig = BusConfig()
    """Bus settings; ``bus.endpoints.monitor_view`` is where the monitor answers."""
    monitor_address: str | None = None
    """Where the monitor's live view answers, e.g. ``tcp://gpu-node-3:5556`` from a laptop
    (``--monitor`` for short); None uses ``bus.endpoints.monitor_view``."""
    api_key: Secret | None = None
    """The monitor's ``view_api_key`` (also read from ``RLBUS_MONITOR__VIEW_API_KEY``)."""
    json_lines: bool = False
    """Print one JSON object per refresh, one per line, for scripts (``--json`` for short)."""
    once: bool = False
    """Show one snapshot and exit."""
    interval_s: float = Field(2.0, gt=0)
    """Seconds between refreshes."""
    timeout_s: float = Field(10.0, gt=0)
    """How long to wait for the monitor's answer before saying it is unreachable."""
    num_log_lines: int = Field(15, ge=0)
    """Most recent log lines shown under the view on a terminal."""
