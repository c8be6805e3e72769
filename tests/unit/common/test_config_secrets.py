"""Secret config fields: redacted wherever a config is written, passed to children by environment."""

from __future__ import annotations

import stat
import tomllib

import pytest

from rlbus.config import ConfigError, load_config
from rlbus.config.base import REDACTED, secret_paths, to_toml
from rlbus.services.entry import write_resolved
from rlbus.services.inference.config import InferenceConfig
from rlbus.services.run_config import RlConfig

SECRETS = {"inference": {"api_key": "inf-key"}, "monitor": {"view_api_key": "view-key"}}


def test_the_secret_fields_are_known():
    assert set(secret_paths(RlConfig)) == {("inference", "api_key"), ("env_worker", "api_key"),
                                           ("monitor", "view_api_key"), ("monitor", "wandb", "api_key"),
                                           ("orchestrator", "teacher", "client", "api_key"),
                                           ("env_worker", "teacher", "api_key")}  # fmt: skip


def test_resolved_config_files_hold_no_secret_and_only_their_user_reads_them(tmp_path):
    config = RlConfig(output_dir=tmp_path / "run", **SECRETS)
    paths = write_resolved(config)
    for path in paths:
        assert "inf-key" not in path.read_text() and "view-key" not in path.read_text(), path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "run" / "configs").stat().st_mode) == 0o700
    merged = tomllib.loads((tmp_path / "run" / "configs" / "rl.toml").read_text())
    assert merged["inference"]["api_key"] == merged["env_worker"]["api_key"] == REDACTED
    assert merged["monitor"]["view_api_key"] == REDACTED


def test_a_redacted_file_takes_the_secret_from_the_environment(tmp_path):
    path = tmp_path / "inference.toml"
    path.write_text(to_toml(InferenceConfig(api_key="inf-key")))
    assert load_config(InferenceConfig, ["@", str(path)], env={"api_key": "inf-key"}).api_key == "inf-key"


def test_a_redacted_placeholder_is_never_taken_as_the_secret(tmp_path):
    path = tmp_path / "inference.toml"
    path.write_text(to_toml(InferenceConfig(api_key="inf-key")))
    with pytest.raises(ConfigError) as error:
        load_config(InferenceConfig, ["@", str(path)], env={})
    assert f"api_key: holds the placeholder '{REDACTED}'" in str(error.value)
    assert "RLBUS_<SECTION>__<KEY>" in str(error.value)


def test_the_secret_is_still_usable_in_memory():
    config = RlConfig(**SECRETS)
    assert (config.inference.api_key, config.env_worker.api_key) == ("inf-key", "inf-key")
    assert "inf-key" not in str(config.model_dump()) and "inf-key" not in to_toml(config)
