"""`rlbus rl` with ``[shared_trainer]``: no trainer of its own, the bus and the adapter name point at
the shared trainer, the orchestrator joins with the run's RunSpec; what cannot work is refused."""

from __future__ import annotations

import tomllib

import pytest
from pydantic import ValidationError

from rlbus.config import ConfigError
from rlbus.config.base import to_toml
from rlbus.services.launcher.processes import process_table
from rlbus.services.orchestrator.config import OrchestratorConfig
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.checks import check_config
from rlbus.services.run_config.shared_trainer import run_id_problem, shared_trainer_problems

SHARED = {"address": "tcp://127.0.0.1:6001", "weights": "tcp://127.0.0.1:6002", "announce": "tcp://127.0.0.1:6003"}
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


def rl_config(tmp_path, shared: dict | None = None, lora: dict | None = None, **values) -> RlConfig:
    trainer = values.pop("trainer", {})
    if lora is not None:
        trainer = {**trainer, "lora": lora}
    return RlConfig(output_dir=tmp_path, shared_trainer=shared, trainer=trainer, **values)


def test_a_shared_trainer_run_points_every_service_at_it(tmp_path):
    config = rl_config(tmp_path, {**SHARED, "run_id": "reverse-a"}, LORA, max_steps=5, seed=7,
                       trainer={"optimizer": {"lr": 0.02}, "scheduler": {"warmup_steps": 2}, "loss": {"type": "pg"}})  # fmt: skip
    endpoints = config.bus.endpoints
    assert (endpoints.trainer_runs, endpoints.trainer_weights, endpoints.trainer_announce) == tuple(SHARED.values())
    assert config.inference.bus.endpoints.trainer_weights == SHARED["weights"]  # one bus for every service
    inference, worker = config.inference, config.env_worker
    assert (inference.enable_lora, inference.await_adapter, worker.request_model) == (True, "reverse-a", "reverse-a")
    join = config.orchestrator.shared_trainer
    assert (join.runs_address, join.run_id) == (SHARED["address"], "reverse-a")
    spec = join.spec
    assert (spec["run_id"], spec["max_steps"], spec["seed"]) == ("reverse-a", 5, 7)
    assert spec["lora"]["rank"] == 4 and spec["lora"]["name"] == "reverse-a"
    assert (spec["optimizer"]["lr"], spec["scheduler"]["warmup_steps"], spec["loss"]["type"]) == (0.02, 2, "pg")
    assert shared_trainer_problems(config) == []


def test_the_spec_is_a_run_spec_the_trainer_takes(tmp_path):
    from rlbus.services.trainer.multi_run import RunSpec

    config = rl_config(tmp_path, {"run_id": "run-b"}, LORA, max_steps=3)
    spec = RunSpec.model_validate(config.orchestrator.shared_trainer.spec)
    assert (spec.run_id, spec.lora.rank, spec.lora.target_modules, spec.max_steps) == (
        "run-b",
        4,
        ["q_proj", "v_proj"],
        3,
    )


def test_no_trainer_is_started(tmp_path):
    names = [spec.name for spec in process_table(rl_config(tmp_path, {"run_id": "run-x"}, LORA), tmp_path, environ={})]
    assert "trainer" not in names and {"monitor", "inference", "orchestrator", "env-worker-0"} <= set(names)
    assert "trainer" in [spec.name for spec in process_table(rl_config(tmp_path), tmp_path, environ={})]


def test_the_run_id_can_be_the_adapters_name(tmp_path):
    config = rl_config(tmp_path, {}, {**LORA, "name": "first-letter-b"})
    assert config.orchestrator.shared_trainer.run_id == config.inference.await_adapter == "first-letter-b"
    assert config.bus.endpoints.trainer_runs == "tcp://127.0.0.1:5559"  # the trainer's default


def test_resolved_configs_load_back_unchanged(tmp_path):
    config = rl_config(tmp_path, {**SHARED, "run_id": "reverse-a"}, LORA, max_steps=4)
    again = RlConfig(**tomllib.loads(to_toml(config)))  # the launcher's configs/rl.toml, read again
    assert again.orchestrator.shared_trainer == config.orchestrator.shared_trainer
    section = OrchestratorConfig(**tomllib.loads(to_toml(config.orchestrator)))  # configs/orchestrator.toml
    assert section.shared_trainer == config.orchestrator.shared_trainer


def test_a_run_id_and_an_adapter_name_that_differ_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="shared_trainer.run_id = 'run-x' but trainer.lora.name = 'b'"):
        rl_config(tmp_path, {"run_id": "run-x"}, {**LORA, "name": "b"})


def test_a_bus_endpoint_that_disagrees_with_the_shared_trainer_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="bus.endpoints.trainer_weights = 'tcp://127.0.0.1:7000' but "
                       "shared_trainer.weights"):  # fmt: skip
        rl_config(tmp_path, {**SHARED, "run_id": "a"}, LORA,
                  bus={"endpoints": {"trainer_weights": "tcp://127.0.0.1:7000"}})  # fmt: skip


def test_a_shared_trainer_without_lora_is_refused(tmp_path):
    config = rl_config(tmp_path, {"run_id": "run-a"})
    [problem] = shared_trainer_problems(config)
    assert problem.key == "trainer.lora" and "add a [trainer.lora] section" in str(problem)
    assert config.orchestrator.shared_trainer is None
    with pytest.raises(ConfigError, match=r"trainer.lora = None: a shared trainer trains each run"):
        check_config(config)


@pytest.mark.parametrize(("shared", "lora", "key", "needle"), [
    ({"run_id": "run.a"}, LORA, "shared_trainer.run_id", "use only letters, digits"),
    ({}, {**LORA, "name": "my.adapter"}, "trainer.lora.name", "use only letters, digits"),
    ({"run_id": "x" * 65}, LORA, "shared_trainer.run_id", "more than 64"),
    ({}, LORA, "shared_trainer.run_id", "name the run on the shared trainer"),
    ({"run_id": "run-x"}, {**LORA, "transfer": "merged"}, "trainer.lora.transfer", "sends each run only its adapter"),
])  # fmt: skip
def test_what_a_shared_trainer_cannot_train_is_refused_by_key(tmp_path, shared, lora, key, needle):
    [problem] = shared_trainer_problems(rl_config(tmp_path, shared, lora))
    assert problem.key == key and needle in str(problem), str(problem)


def test_slurm_and_trainer_placement_are_refused(tmp_path):
    config = rl_config(tmp_path, {"run_id": "run-x"}, LORA, slurm={"enabled": True})
    assert [p.key for p in shared_trainer_problems(config)] == ["slurm.enabled"]
    config = rl_config(tmp_path, {"run_id": "run-x"}, LORA, trainer={"num_ranks": 2})
    assert "trainer.num_ranks" in [p.key for p in shared_trainer_problems(config)]


def test_a_join_without_the_shared_trainer_section_is_refused(tmp_path):
    join = {"runs_address": "tcp://127.0.0.1:6001", "run_id": "run-x", "spec": {}}
    [problem] = shared_trainer_problems(rl_config(tmp_path, orchestrator={"shared_trainer": join}))
    assert problem.key == "orchestrator.shared_trainer" and "set [shared_trainer]" in str(problem)


def test_the_run_id_rule_names_what_is_wrong():
    # The same function as the trainer's (rlbus.identity): a run the launcher accepts the trainer accepts.
    for run_id in ["run-a_1", "A9", "x" * 64, "reverse-b"]:
        assert run_id_problem(run_id) is None, run_id
    refused = {"": "empty", "x" * 65: "65 characters", "a.b": "only letters", "a/b": "only letters",
               "_a": "starting with", "ä": "only letters", "lora": "prefix 'lora_'"}  # fmt: skip
    for run_id, reason in refused.items():
        assert reason in (run_id_problem(run_id) or ""), run_id
