"""The collective weight transport as ``rlbus rl`` wires it from ``trainer.weight_transport``."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlbus.config import load_config
from rlbus.services.inference.config import InferenceConfig
from rlbus.services.launcher.processes import process_table
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.checks import rl_problems
from rlbus.services.run_config.placement import FAKE_GPU_COUNT_VARIABLE
from rlbus.services.run_config.weight_group import LOCAL_PORT
from rlbus.services.trainer.config import TrainerConfig

FOUR_GPUS = {FAKE_GPU_COUNT_VARIABLE: "4"}
COLLECTIVE = {"weight_transport": "collective"}


def replica_args(config: RlConfig) -> dict[str, tuple[str, ...]]:
    return {spec.name: spec.args for spec in process_table(config, Path("out/configs"), FOUR_GPUS)
            if spec.service == "inference"}  # fmt: skip


def group_flags(args: tuple[str, ...]) -> dict[str, str]:
    flags = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
    return {key: value for key, value in flags.items() if key.startswith("--weight-")}


def problem_keys(config: RlConfig, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv(FAKE_GPU_COUNT_VARIABLE, "4")
    return [problem.key for problem in rl_problems(config)]


def test_two_replicas_join_the_trainers_group_as_ranks_one_and_two():
    config = RlConfig(model="m", inference_gpu_ids=[0, 1],
                      trainer={**COLLECTIVE, "weight_group_backend": "gloo", "weight_group_timeout_s": 90})  # fmt: skip
    address = f"127.0.0.1:{LOCAL_PORT}"
    assert (config.trainer.weight_group_address, config.trainer.weight_group_replicas) == (address, 2)
    flags = {name: group_flags(args) for name, args in replica_args(config).items()}
    common = {"--weight-transport": "collective", "--weight-group-address": address, "--weight-group-replicas": "2",
              "--weight-group-backend": "gloo", "--weight-group-timeout-s": "90.0"}  # fmt: skip
    assert flags == {"inference-0": {**common, "--weight-group-rank": "1"},
                     "inference-1": {**common, "--weight-group-rank": "2"}}  # fmt: skip
    # Each replica's command line (the section's file, then its flags) reads as the settings its worker gets.
    replica = load_config(InferenceConfig, ["--model", "m", *replica_args(config)["inference-1"]], env={})
    assert replica.weight_group_settings() == {"address": address, "rank": 2, "size": 3, "backend": "gloo",
                                               "timeout_s": 90.0, "verify": True}  # fmt: skip
    # The trainer's resolved section runs alone with the address and size it was given.
    trainer = TrainerConfig(**config.trainer.model_dump())
    assert (trainer.weight_group_address, trainer.weight_group_replicas) == (address, 2)


def test_a_set_address_is_kept_and_a_wildcard_host_reached_over_loopback():
    config = RlConfig(model="m", trainer={**COLLECTIVE, "weight_group_address": "0.0.0.0:6123"})
    assert config.trainer.weight_group_address == "0.0.0.0:6123"
    assert group_flags(replica_args(config)["inference"])["--weight-group-address"] == "127.0.0.1:6123"


def test_the_bus_adds_no_flags():
    assert all(not group_flags(args) for args in replica_args(RlConfig(model="m", inference_gpu_ids=[0, 1])).values())


def test_a_consistent_collective_run_has_no_problems(monkeypatch):
    config = RlConfig(model="m", inference_gpu_ids=[0, 1], trainer_gpu_ids=[2], trainer=COLLECTIVE)
    assert problem_keys(config, monkeypatch) == []


@pytest.mark.parametrize(("fields", "key"), [
    ({"inference": {"tensor_parallel_size": 2}}, "inference.tensor_parallel_size"),
    ({"inference": {"weights_fanout": 1}}, "inference.weights_fanout"),
    ({"trainer": {**COLLECTIVE, "weight_group_replicas": 3}}, "trainer.weight_group_replicas"),
    ({"inference": {"weight_group_rank": 2}}, "inference.weight_group_rank"),
    ({"trainer": {**COLLECTIVE, "lora": {"rank": 4}}}, "trainer.lora.transfer"),
])  # fmt: skip
def test_settings_that_cannot_work_with_the_collective_transport_are_refused(fields, key, monkeypatch):
    values = {"model": "m", "inference_gpu_ids": [0, 1, 2, 3], "trainer": COLLECTIVE, **fields}
    config = RlConfig(**values)
    keys = problem_keys(config, monkeypatch)
    assert key in keys, keys
    fixes = [str(problem) for problem in rl_problems(config) if problem.key == key]
    assert fixes and ("weight_transport" in fixes[0] or "trainer" in fixes[0]), fixes


def test_the_replicas_own_transport_is_refused_in_favour_of_the_trainers(monkeypatch):
    replica = {"weight_transport": "collective", "weight_group_address": "127.0.0.1:6123"}
    keys = problem_keys(RlConfig(model="m", inference=replica), monkeypatch)
    assert keys == ["inference.weight_transport", "inference.weight_group_address"]


def test_the_group_port_may_not_take_another_sockets(monkeypatch):
    on_the_bus = RlConfig(model="m", trainer={**COLLECTIVE, "weight_group_address": "127.0.0.1:5553"})
    assert problem_keys(on_the_bus, monkeypatch) == ["trainer.weight_group_address"]  # trainer_weights' port
    on_a_replica = RlConfig(model="m", inference_gpu_ids=[0, 1], inference={"port": 7000},
                            trainer={**COLLECTIVE, "weight_group_address": "127.0.0.1:7001"})  # fmt: skip
    assert problem_keys(on_a_replica, monkeypatch) == ["trainer.weight_group_address"]


def test_slurm_runs_are_refused(monkeypatch):
    config = RlConfig(model="m", trainer=COLLECTIVE, slurm={"enabled": True})
    assert "trainer.weight_transport" in problem_keys(config, monkeypatch)
