"""Weights & Biases logging: one run for the whole job, written by the monitor alone.

Services never talk to W&B; the monitor logs every service's metrics into one
run, keyed on the training step (``define_metric("*", step_metric="step")``,
so a late report of an earlier step still lands on its step). The run id is
kept in ``<output_dir>/wandb-run-id``: a restarted monitor resumes the same run.
``wandb`` is imported only when enabled (the ``monitor`` extra).
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from loguru import logger

from rlbus.config import read_toml
from rlbus.config.base import redact_by_name
from rlbus.messages import Sample
from rlbus.services.monitor.config import MonitorConfig

RUN_ID_FILE = "wandb-run-id"
SAMPLE_COLUMNS = ["step", "env_id", "prompt", "completion", "reward", "advantage"]


class WandbSink:
    """Logs released step rows and sample tables to one W&B run."""

    def __init__(self, config: MonitorConfig) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "monitor.wandb.enabled is set but the wandb package is not installed: pip install 'rlbus[monitor]'"
            ) from None
        self.wandb = wandb
        self.samples_interval = config.wandb.samples_interval
        self.last_table_step: int | None = None
        mode = config.wandb.mode or os.environ.get("WANDB_MODE") or "offline"
        run_id_path = config.output_dir / RUN_ID_FILE
        run_id = run_id_path.read_text().strip() if run_id_path.exists() else secrets.token_hex(6)
        config.output_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=config.wandb.project, entity=config.wandb.entity, name=config.wandb.name, id=run_id,
            resume="allow", mode=mode, dir=str(config.output_dir), config=_run_config(config),
            # The monitor's console is its own log; W&B must not wrap stdout/stderr.
            settings=wandb.Settings(console="off", **_api_key(config)),
        )  # fmt: skip
        run_id_path.write_text(run_id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        logger.info("W&B run {} ({} mode) in {}", run_id, mode, self.run.dir)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.run.log({**metrics, "step": step})

    def log_samples(self, step: int, samples: list[Sample]) -> bool:
        """Log a table of ``samples`` unless one was logged less than ``samples_interval`` steps ago."""
        if not samples or (self.last_table_step is not None and step < self.last_table_step + self.samples_interval):
            return False
        rows = [[step, s.env_id, s.prompt, s.completion, s.reward, s.advantage] for s in samples]
        self.run.log({"samples": self.wandb.Table(columns=SAMPLE_COLUMNS, data=rows), "step": step})
        self.last_table_step = step
        return True

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _api_key(config: MonitorConfig) -> dict[str, str]:
    """wandb.Settings' api_key when the config holds one; otherwise wandb finds its own."""
    return {"api_key": config.wandb.api_key} if config.wandb.api_key else {}


def _run_config(config: MonitorConfig) -> dict[str, Any]:
    """The whole job's config when the launcher wrote it next to us, else the monitor's own; secrets
    redacted (the file has them redacted already, unless an older version wrote it)."""
    merged = config.output_dir / "configs" / "rl.toml"
    if merged.exists():
        return redact_by_name(read_toml(merged))
    return config.model_dump(mode="json")
