"""`rlbus rl` with ``[trainer.lora]``: replicas serve the adapter, env-workers name it, bad ranks stop."""

from __future__ import annotations

import pytest

from rlbus.config import ConfigError
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.checks import adapter_problems, check_config, lora_rank_problems


def rl_config(tmp_path, lora: dict | None, **sections) -> RlConfig:
    trainer = {"lora": lora} if lora is not None else {}
    return RlConfig(output_dir=tmp_path, trainer=trainer, **sections)


def test_an_adapter_run_turns_lora_on_and_names_the_adapter_everywhere(tmp_path):
    config = rl_config(tmp_path, {"rank": 24, "name": "run-a"})
    inference, worker = config.inference, config.env_worker
    assert (inference.enable_lora, inference.max_lora_rank, inference.await_adapter) == (True, 32, "run-a")
    assert worker.request_model == "run-a"
    assert adapter_problems(config) == [] and lora_rank_problems(inference, "inference.") == []


@pytest.mark.parametrize("lora", [None, {"transfer": "merged"}])
def test_full_and_merged_runs_leave_inference_as_configured(tmp_path, lora):
    config = rl_config(tmp_path, lora)
    assert (config.inference.enable_lora, config.inference.await_adapter, config.env_worker.request_model) == (
        False, None, None)  # fmt: skip


def test_a_rank_above_the_replicas_max_lora_rank_is_refused_by_name(tmp_path):
    config = rl_config(tmp_path, {"rank": 32}, inference={"max_lora_rank": 16})
    [problem] = adapter_problems(config)
    assert (
        problem.key == "trainer.lora.rank"
        and "max_lora_rank = 16" in str(problem)
        and "raise that to 32" in str(problem)
    )


def test_an_adapter_run_with_lora_off_on_the_replicas_is_refused(tmp_path):
    config = rl_config(tmp_path, {"rank": 8}, inference={"enable_lora": False})
    [problem] = adapter_problems(config)
    assert problem.key == "inference.enable_lora" and "transfer = 'merged'" in str(problem)


def test_a_max_lora_rank_vllm_does_not_take_is_refused(tmp_path):
    config = rl_config(tmp_path, {"rank": 4}, inference={"max_lora_rank": 4})
    [problem] = lora_rank_problems(config.inference, "inference.")
    assert problem.key == "inference.max_lora_rank" and "set 8" in str(problem)
    with pytest.raises(ConfigError, match="inference.max_lora_rank = 4"):
        check_config(config)
