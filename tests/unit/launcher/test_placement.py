"""GPU placement of a local run: the environment the launcher builds per process, and bad layouts.

No GPU is needed: ``RLBUS_FAKE_GPU_COUNT`` (tests only) stands for the machine's GPU count, and
the launcher's own ``CUDA_VISIBLE_DEVICES`` is what its ids index into.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from rlbus.services.cli import main
from rlbus.services.launcher.processes import Child, ProcessSpec, process_table
from rlbus.services.launcher.slurm_jobs import array_jobs, sbatch_args, slurm_section
from rlbus.services.launcher.slurm_task import trainer_node_env
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.placement import FAKE_GPU_COUNT_VARIABLE, placement_problems, visible_gpus

FOUR_GPUS = {FAKE_GPU_COUNT_VARIABLE: "4"}
CONFIGS = Path("out/configs")


def rl(**values: Any) -> RlConfig:
    return RlConfig(num_env_workers=2, **values)


def table_env(config: RlConfig, environ: dict[str, str]) -> dict[str, dict[str, str]]:
    return {spec.name: dict(spec.env) for spec in process_table(config, CONFIGS, environ)}


def test_two_replicas_and_two_trainer_ranks_on_four_gpus():
    config = rl(inference_gpu_ids=[0, 1], trainer_gpu_ids=[2, 3])
    assert placement_problems(config, FOUR_GPUS) == []
    specs = {spec.name: spec for spec in process_table(config, CONFIGS, FOUR_GPUS)}
    assert list(specs) == ["monitor", "inference-0", "inference-1", "trainer", "orchestrator", "env-worker-0",
                           "env-worker-1"]  # fmt: skip
    assert specs["inference-0"].env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert specs["inference-1"].env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert specs["trainer"].env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    for name in ("monitor", "orchestrator", "env-worker-0", "env-worker-1"):
        assert specs[name].env == {}, name  # GPU-free services see what the launcher sees
    port = config.inference.port
    assert specs["inference-1"].args == ("--port", str(port + 1), "--replica-id", "inference-1")
    assert config.env_worker.inference_urls == [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port + 1}/v1"]
    assert config.trainer.num_ranks == 2 and config.orchestrator.trainer_world_size == 2
    assert config.inference.tensor_parallel_size == 1


def test_groups_set_tensor_parallelism():
    config = rl(inference_gpu_ids=[[0, 1], [2, 3]])
    assert placement_problems(config, FOUR_GPUS) == []
    envs = table_env(config, FOUR_GPUS)
    assert envs["inference-0"] == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert envs["inference-1"] == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert envs["trainer"] == {}
    assert config.inference.tensor_parallel_size == 2
    assert config.trainer.num_ranks == 1
    flat = rl(inference_gpu_ids=[0, 1, 2, 3], inference={"tensor_parallel_size": 2})
    assert table_env(flat, FOUR_GPUS)["inference-1"] == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_one_gpu_shared_by_inference_and_trainer():
    config = rl(inference_gpu_ids=[0], trainer_gpu_ids=[0], inference={"gpu_memory_utilization": 0.5})
    assert placement_problems(config, {FAKE_GPU_COUNT_VARIABLE: "1"}) == []
    envs = table_env(config, {FAKE_GPU_COUNT_VARIABLE: "1"})
    assert envs["inference"] == envs["trainer"] == {"CUDA_VISIBLE_DEVICES": "0"}


def test_ids_index_into_the_launchers_visible_devices():
    config = rl(inference_gpu_ids=[0], trainer_gpu_ids=[2, 3])
    environ = {"CUDA_VISIBLE_DEVICES": "4,5,GPU-abc,7"}
    assert placement_problems(config, environ) == []
    envs = table_env(config, environ)
    assert envs["inference"] == {"CUDA_VISIBLE_DEVICES": "4"}
    assert envs["trainer"] == {"CUDA_VISIBLE_DEVICES": "GPU-abc,7"}


def test_without_ids_nothing_is_placed():
    config = rl()
    assert placement_problems(config, {}) == []
    assert all(env == {} for env in table_env(config, {}).values())
    assert config.trainer.num_ranks == 1 and config.orchestrator.trainer_world_size == 1


def test_a_started_child_sees_its_placement(tmp_path):
    code = "import os; print('seen', os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ.get('KEPT'))"
    spec = ProcessSpec("trainer", "trainer", tmp_path / "t.toml", env={"CUDA_VISIBLE_DEVICES": "2,3"})
    child = Child.start(spec, [sys.executable, "-c", code], tmp_path, env={"KEPT": "yes", "CUDA_VISIBLE_DEVICES": "9"})
    assert child.popen.wait(60) == 0
    assert (tmp_path / "trainer.out").read_text().strip() == "seen 2,3 yes"


# (test id, config values, environment, key named, words in the message)
BAD_LAYOUTS = [
    ("overlap-without-split", {"inference_gpu_ids": [0, 1], "trainer_gpu_ids": [1],
                               "inference": {"gpu_memory_utilization": 0.9}}, FOUR_GPUS,
     "inference.gpu_memory_utilization", "GPU(s) [1] are shared"),
    ("id-does-not-exist", {"trainer_gpu_ids": [3, 4]}, FOUR_GPUS, "trainer_gpu_ids", "GPU(s) [4] do not exist"),
    ("no-gpu-here", {"inference_gpu_ids": [0]}, {"CUDA_VISIBLE_DEVICES": ""}, "inference_gpu_ids",
     "no GPU is visible on this machine"),
    ("does-not-divide", {"inference_gpu_ids": [0, 1, 2], "inference": {"tensor_parallel_size": 2}}, FOUR_GPUS,
     "inference_gpu_ids", "3 GPUs do not divide into replicas of inference.tensor_parallel_size = 2"),
    ("unequal-groups", {"inference_gpu_ids": [[0, 1], [2]]}, FOUR_GPUS, "inference_gpu_ids",
     "groups of sizes [1, 2]"),
    ("group-vs-tensor-parallel", {"inference_gpu_ids": [[0, 1]], "inference": {"tensor_parallel_size": 1}},
     FOUR_GPUS, "inference.tensor_parallel_size", "have 2 GPUs each"),
    ("listed-twice", {"inference_gpu_ids": [[0, 1], [1, 2]]}, FOUR_GPUS, "inference_gpu_ids",
     "GPU(s) [1] listed more than once"),
    ("ranks-vs-gpus", {"trainer_gpu_ids": [0, 1], "trainer": {"num_ranks": 3}}, FOUR_GPUS, "trainer.num_ranks",
     "names 2 GPU(s)"),
    ("world-size", {"trainer": {"num_ranks": 2}, "orchestrator": {"trainer_world_size": 1}}, {},
     "orchestrator.trainer_world_size", "runs 2 rank(s)"),
    ("compile-on-ranks", {"trainer": {"num_ranks": 2, "compile": True}}, {}, "trainer.compile",
     "runs 2 rank(s) and compiles on one only"),
    ("empty", {"trainer_gpu_ids": []}, FOUR_GPUS, "trainer_gpu_ids", "an empty list places nothing"),
    ("slurm", {"trainer_gpu_ids": [0], "slurm": {"enabled": True}}, FOUR_GPUS, "trainer_gpu_ids",
     "slurm.<service>.gpus"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "environ", "key", "words"), [case[1:] for case in BAD_LAYOUTS],
                         ids=[case[0] for case in BAD_LAYOUTS])  # fmt: skip
def test_bad_layouts_are_named(values, environ, key, words):
    problems = placement_problems(rl(**values), environ)
    assert [problem.key for problem in problems] == [key], problems
    assert words in problems[0].fix, problems[0].fix


def test_rl_refuses_a_bad_layout_before_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAKE_GPU_COUNT_VARIABLE, "2")
    code = main(["rl", "--output-dir", str(tmp_path / "run"), "--trainer-gpu-ids", "[1, 2]", "--dry-run"])
    assert code == 2
    assert "trainer_gpu_ids = [1, 2]: GPU(s) [2] do not exist: this machine shows 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_visible_gpus_without_any(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert visible_gpus({}) == ([], "no nvidia-smi on PATH and no CUDA_VISIBLE_DEVICES")


def test_nvidia_smi_listing_is_counted(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-2)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus({}) == (["0", "1"], "nvidia-smi -L lists 2")


def test_a_slurm_trainer_task_starts_its_ranks_on_its_node():
    config = rl(trainer={"num_ranks": 4}, slurm={"enabled": True, "trainer": {"gpus": 4}})
    assert placement_problems(config, {}) == []
    assert slurm_section(config, "trainer")["num_ranks"] == 4  # the task's `rlbus trainer` starts 4 ranks
    assert slurm_section(config, "orchestrator")["trainer_world_size"] == 4


class FakeFinder:
    """Answers where tasks run, as the SLURM controller would."""

    def own_address(self) -> str:
        return "10.0.0.5"

    def task_address(self, section: str, array_id: str, task_id: int) -> str:
        return f"node-of-{section}-{array_id}-{task_id}"


def test_a_trainer_on_two_slurm_nodes_is_one_task_per_node():
    config = rl(trainer={"num_ranks": 2}, slurm={"enabled": True, "trainer_nodes": 2, "trainer": {"gpus": 2}})
    assert placement_problems(config, {}) == []
    trainer = next(job for job in array_jobs(config) if job.section == "trainer")
    assert trainer.num_tasks == 2
    assert "--array=0-1" in sbatch_args(config, trainer, {"monitor": "1", "orchestrator": "2"})
    assert [trainer.task_name(i) for i in range(2)] == ["trainer-0", "trainer-1"]
    assert slurm_section(config, "orchestrator")["trainer_world_size"] == 4  # 2 nodes x 2 ranks


def test_each_trainer_node_learns_where_the_ranks_meet():
    array = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_JOB_ID": "77"}
    assert trainer_node_env("trainer", 0, array, FakeFinder()) == {
        "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}  # fmt: skip
    second = trainer_node_env("trainer", 1, {**array, "MASTER_PORT": "31000"}, FakeFinder())
    assert second == {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node-of-trainer-77-0", "MASTER_PORT": "31000"}
    assert trainer_node_env("trainer", 0, {"SLURM_ARRAY_TASK_COUNT": "1"}, FakeFinder()) == {}
    assert trainer_node_env("inference", 1, array, FakeFinder()) == {}
