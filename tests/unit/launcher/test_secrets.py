"""Secrets reach the services the launcher starts by environment, never through a config file."""

from __future__ import annotations

import stat
import tomllib

from rlbus.config import load_config
from rlbus.config.base import REDACTED
from rlbus.services.entry import write_resolved
from rlbus.services.launcher.run import child_environment
from rlbus.services.launcher.slurm import write_job_scripts
from rlbus.services.launcher.slurm_jobs import array_jobs
from rlbus.services.launcher.slurm_task import private_values, write_config
from rlbus.services.run_config import SECTIONS, RlConfig, service_env

SECRETS = {"inference": {"api_key": "inf-key"}, "monitor": {"view_api_key": "view-key"}}
FILES = {"inference": "inference", "env_worker": "env-worker", "monitor": "monitor"}


def test_local_children_read_their_secrets_from_the_environment(tmp_path):
    config = RlConfig(output_dir=tmp_path, **SECRETS)
    env = child_environment(config, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "RLBUS_INFERENCE__API_KEY": "inf-key", "RLBUS_ENV_WORKER__API_KEY": "inf-key",
                   "RLBUS_MONITOR__VIEW_API_KEY": "view-key"}  # fmt: skip
    write_resolved(config)
    for section, stem in FILES.items():
        path = tmp_path / "configs" / f"{stem}.toml"
        child = load_config(SECTIONS[section], ["@", str(path)], env=service_env(section, env))
        assert child == getattr(config, section), section


def test_slurm_replicas_get_a_generated_api_key_shared_with_the_env_workers():
    jobs = {job.section: tomllib.loads(job.config_text) for job in array_jobs(RlConfig())}
    key = jobs["inference"]["api_key"]
    assert len(key) >= 32 and jobs["env_worker"]["api_key"] == key
    assert jobs["inference"]["host"] == "0.0.0.0"
    again = {job.section: tomllib.loads(job.config_text) for job in array_jobs(RlConfig())}
    assert again["inference"]["api_key"] != key  # one per run


def test_slurm_jobs_carry_the_users_key_or_none_when_opted_out():
    jobs = {job.section: tomllib.loads(job.config_text) for job in array_jobs(RlConfig(**SECRETS))}
    assert jobs["inference"]["api_key"] == jobs["env_worker"]["api_key"] == "inf-key"
    assert jobs["monitor"]["view_api_key"] == "view-key"
    open_config = RlConfig(inference={"allow_insecure_remote": True})
    assert "api_key" not in tomllib.loads(array_jobs(open_config)[3].config_text)


def test_a_slurm_task_moves_its_secrets_into_the_environment(tmp_path):
    values = {"output_dir": str(tmp_path), "host": "0.0.0.0", "api_key": "inf-key", "port": 8000}
    written, env = private_values(values, "inference")
    assert env == {"RLBUS_INFERENCE__API_KEY": "inf-key"} and written["api_key"] == REDACTED
    path = write_config(written, "inference", 0)
    assert "inf-key" not in path.read_text() and stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_config(SECTIONS["inference"], ["@", str(path)], env=service_env("inference", env))
    assert loaded.api_key == "inf-key"
    assert private_values({"batch_size": 8}, "orchestrator") == ({"batch_size": 8}, {})


def test_dry_run_job_scripts_are_private(tmp_path):
    config = RlConfig(output_dir=tmp_path, bus={"curve": {"allow_insecure_remote": True}}, **SECRETS)
    assert write_job_scripts(config) == 0
    scripts = list((tmp_path / "configs" / "slurm").glob("*.sbatch"))
    assert len(scripts) == 5 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in scripts)


def test_a_standalone_env_worker_takes_the_inference_key_from_the_environment(tmp_path):
    config = RlConfig(output_dir=tmp_path, **SECRETS)
    write_resolved(config)
    env = service_env("env_worker", {"RLBUS_INFERENCE__API_KEY": "inf-key"})  # compose's .env
    path = tmp_path / "configs" / "env-worker.toml"
    assert load_config(SECTIONS["env_worker"], ["@", str(path)], env=env).api_key == "inf-key"
