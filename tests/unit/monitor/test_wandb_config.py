"""The config uploaded to W&B holds no secret (no wandb needed)."""

from __future__ import annotations

from rlbus.config.base import REDACTED
from rlbus.services.entry import write_resolved
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.monitor.wandb_sink import _run_config
from rlbus.services.run_config import RlConfig


def test_the_run_config_uploaded_to_wandb_is_redacted(tmp_path):
    write_resolved(RlConfig(output_dir=tmp_path, inference={"api_key": "inf-key"}, monitor={"view_api_key": "v"}))
    uploaded = _run_config(MonitorConfig(output_dir=tmp_path, view_api_key="v"))
    assert uploaded["inference"]["api_key"] == uploaded["env_worker"]["api_key"] == REDACTED
    assert uploaded["monitor"]["view_api_key"] == REDACTED


def test_the_monitors_own_config_is_redacted_when_no_run_config_exists(tmp_path):
    assert _run_config(MonitorConfig(output_dir=tmp_path, view_api_key="v"))["view_api_key"] == REDACTED


def test_an_older_run_config_with_secrets_in_clear_is_redacted_before_upload(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rl.toml").write_text('[inference]\napi_key = "inf-key"\n[monitor]\nview_api_key = "v"\n')
    uploaded = _run_config(MonitorConfig(output_dir=tmp_path))
    assert uploaded == {"inference": {"api_key": REDACTED}, "monitor": {"view_api_key": REDACTED}}
