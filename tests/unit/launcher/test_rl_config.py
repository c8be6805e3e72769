"""The merged rl config: sections, shared-field propagation, per-service views."""

import pytest

from rlbus.config import ConfigError, load_config, write_toml
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.run_config import SECTIONS, RlConfig, service_env
from rlbus.services.trainer.config import TrainerConfig


def test_shared_fields_propagate_into_every_section(tmp_path):
    config = load_config(RlConfig, ["--seed", "5", "--output-dir", str(tmp_path), "--max-steps", "7"], env={})
    for name in SECTIONS:
        section = getattr(config, name)
        assert (section.seed, section.output_dir, section.max_steps) == (5, tmp_path, 7), name


def test_section_may_repeat_a_shared_value_but_not_change_it(tmp_path):
    same = tmp_path / "same.toml"
    same.write_text("seed = 3\n[trainer]\nseed = 3\n")
    assert load_config(RlConfig, ["@", str(same)], env={}).trainer.seed == 3
    different = tmp_path / "different.toml"
    different.write_text("seed = 3\n[trainer]\nseed = 4\n")
    with pytest.raises(ConfigError, match=r"trainer.seed = 4 but seed = 3"):
        load_config(RlConfig, ["@", str(different)], env={})


def test_nested_shared_table_conflict_is_named():
    with pytest.raises(ConfigError, match=r"orchestrator.bus = .* but bus = "):
        load_config(RlConfig, ["--orchestrator.bus.endpoints.orchestrator-tasks", "tcp://10.0.0.1:1"], env={})


def test_out_of_range_and_cross_field_errors():
    with pytest.raises(ConfigError, match=r"orchestrator.sampling.temperature: Input should be greater than or equal"):
        load_config(RlConfig, ["--orchestrator.sampling.temperature", "-0.5"], env={})
    with pytest.raises(ConfigError, match=r"batch_size \(30\) must be a multiple of rollouts_per_example \(16\)"):
        load_config(RlConfig, ["--orchestrator.batch-size", "30"], env={})


def test_env_for_one_service_takes_shared_fields_and_its_section_only():
    environ = {"RLBUS_SEED": "9", "RLBUS_ORCHESTRATOR__BATCH_SIZE": "32", "RLBUS_TRAINER__DTYPE": "bfloat16"}
    env = service_env("orchestrator", environ)
    assert env == {"seed": "9", "batch_size": "32"}
    config = load_config(OrchestratorConfig, ["--rollouts-per-example", "8"], env=env)
    assert (config.seed, config.batch_size) == (9, 32)


def test_env_typo_is_caught_even_for_another_service():
    with pytest.raises(ConfigError, match=r"RLBUS_TRAINER__DTYP: unknown key 'trainer.dtyp' \(did you mean 'dtype'\?\)"):
        service_env("orchestrator", {"RLBUS_TRAINER__DTYP": "float32"})


def test_resolved_configs_cover_every_service():
    config = RlConfig()
    assert set(config.resolved_configs()) == {"rl", "inference", "trainer", "orchestrator", "env-worker", "monitor"}


def test_env_workers_follow_the_local_inference_replica_unless_set():
    config = load_config(RlConfig, ["--inference.port", "8123", "--inference.api-key", "k"], env={})
    assert config.env_worker.inference_urls == ["http://127.0.0.1:8123/v1"]
    assert config.env_worker.api_key == "k"
    explicit = load_config(RlConfig, ["--inference.port", "8123", "--env-worker.inference-urls", '["http://h:1/v1"]'],
                           env={})
    assert explicit.env_worker.inference_urls == ["http://h:1/v1"]


def test_run_checkpoints_set_trainer_and_orchestrator_together_unless_a_section_sets_its_own(tmp_path):
    config = load_config(RlConfig, ["--ckpt.resume-step", "20", "--ckpt.interval", "5"], env={})
    assert config.trainer.ckpt.enabled and config.trainer.ckpt.interval == config.orchestrator.ckpt.interval == 5
    assert config.trainer.ckpt.resume_step == config.orchestrator.ckpt.resume_step == 20
    written = load_config(TrainerConfig, ["@", str(write_toml(config.trainer, tmp_path / "trainer.toml"))], env={})
    assert (written.ckpt.enabled, written.ckpt.interval, written.ckpt.resume_step) == (True, 5, 20)
    default = load_config(RlConfig, [], env={})
    assert default.trainer.ckpt.resume_step == default.orchestrator.ckpt.resume_step == -1  # a restart resumes
    own = load_config(RlConfig, ["--trainer.ckpt.resume-step", "3", "--ckpt.resume-step", "4"], env={})
    assert (own.trainer.ckpt.resume_step, own.orchestrator.ckpt.resume_step) == (3, 4)
    with pytest.raises(ConfigError, match="must checkpoint at the same steps"):
        load_config(RlConfig, ["--trainer.ckpt.interval", "2"], env={})


def test_the_run_sets_the_trainers_checkpoint_format_once_unless_the_section_sets_its_own(tmp_path):
    path = tmp_path / "rl.toml"
    path.write_text('[ckpt]\nformat = "sharded"\n')
    config = load_config(RlConfig, ["@", str(path)], env={})
    assert config.trainer.ckpt.format == "sharded"
    written = load_config(TrainerConfig, ["@", str(write_toml(config.trainer, tmp_path / "trainer.toml"))], env={})
    assert written.ckpt.format == "sharded"  # what the trainer process reads
    assert load_config(RlConfig, [], env={}).trainer.ckpt.format == "full"
    own = load_config(RlConfig, ["@", str(path), "--trainer.ckpt.format", "full"], env={})
    assert own.trainer.ckpt.format == "full"
    with pytest.raises(ConfigError, match="ckpt.format"):
        load_config(RlConfig, ["--ckpt.format", "shardd"], env={})
