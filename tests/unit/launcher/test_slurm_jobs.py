"""What ``rlbus rl --slurm`` submits: placeholders, submit order, sbatch options and job scripts."""

import os
import subprocess
import tomllib

import pytest

from rlbus.config import ConfigError, load_config
from rlbus.services.launcher.slurm_jobs import (
    CONFIG_END,
    CONNECTS_TO,
    array_jobs,
    check_binds_allowed,
    job_script,
    key_lines,
    sbatch_args,
)  # fmt: skip
from rlbus.services.launcher.slurm_task import fill_placeholders
from rlbus.services.run_config import RlConfig

PEER_IDS = {"monitor": "11", "orchestrator": "12", "trainer": "13", "inference": "14"}


def jobs_by_section(config: RlConfig) -> dict:
    return {job.section: job for job in array_jobs(config)}


def test_binding_services_are_submitted_first_and_each_array_knows_its_peers():
    jobs = array_jobs(RlConfig(num_env_workers=3, slurm={"num_inference_replicas": 2}))
    assert [job.section for job in jobs] == ["monitor", "orchestrator", "trainer", "inference", "env_worker"]
    peers = {job.section: job.peers() for job in jobs}
    assert peers == {
        "monitor": set(), "orchestrator": {"monitor"}, "trainer": {"monitor", "orchestrator"},
        "inference": {"monitor", "orchestrator", "trainer"}, "env_worker": {"monitor", "orchestrator", "inference"},
    }  # fmt: skip
    assert all(CONNECTS_TO[job.section] <= {j.section for j in jobs[:i]} for i, job in enumerate(jobs))
    assert {job.section: job.num_tasks for job in jobs}["env_worker"] == 3
    assert [jobs[3].task_name(i) for i in range(2)] == ["inference-0", "inference-1"]
    assert jobs[0].task_name(0) == "monitor"


def test_loopback_addresses_become_their_binders_placeholders_and_others_stay():
    config = RlConfig(bus={"endpoints": {"trainer_weights": "tcp://10.0.0.5:7000"}})
    trainer = tomllib.loads(jobs_by_section(config)["trainer"].config_text)
    endpoints = trainer["bus"]["endpoints"]
    assert endpoints["orchestrator_batches"] == "tcp://{orchestrator}:5551"
    assert endpoints["monitor_telemetry"] == "tcp://{monitor}:5555"
    assert endpoints["trainer_weights"] == "tcp://10.0.0.5:7000"  # the user's own address wins
    assert trainer["bus"]["bind_host"] == "0.0.0.0"
    # The monitor never connects to the orchestrator: that endpoint is left as written.
    monitor = tomllib.loads(jobs_by_section(config)["monitor"].config_text)
    assert monitor["bus"]["endpoints"]["orchestrator_tasks"] == "tcp://127.0.0.1:5550"


def test_env_workers_get_one_url_per_inference_replica_unless_set():
    config = RlConfig(inference={"port": 9000}, slurm={"num_inference_replicas": 2})
    worker = tomllib.loads(jobs_by_section(config)["env_worker"].config_text)
    assert worker["inference_urls"] == ["http://{inference.0}:9000/v1", "http://{inference.1}:9001/v1"]
    assert tomllib.loads(jobs_by_section(config)["inference"].config_text)["host"] == "0.0.0.0"
    mine = RlConfig(env_worker={"inference_urls": ["http://lb:80/v1"]})
    assert tomllib.loads(jobs_by_section(mine)["env_worker"].config_text)["inference_urls"] == ["http://lb:80/v1"]


def test_sbatch_options_come_from_config_shared_then_per_service(tmp_path):
    config = RlConfig(output_dir=tmp_path / "my run", slurm={
        "partition": "cpu", "time": "1:00:00", "extra_args": ["--account=proj"],
        "inference": {"gpus": 2, "cpus": 8, "mem": "64G", "partition": "gpu", "extra_args": ["--constraint=a100"]},
    })  # fmt: skip
    jobs = jobs_by_section(config)
    inference = sbatch_args(config, jobs["inference"], PEER_IDS)
    assert "--job-name=rlbus-my_run-inference" in inference and "--array=0-0" in inference
    assert "--dependency=after:11:12:13" in inference
    assert inference[-7:] == ["--cpus-per-task=8", "--gres=gpu:2", "--mem=64G", "--partition=gpu",
                              "--time=1:00:00", "--account=proj", "--constraint=a100"]  # fmt: skip
    monitor = sbatch_args(config, jobs["monitor"], {})
    assert "--partition=cpu" in monitor and not any(a.startswith("--dependency") for a in monitor)


def test_job_script_carries_the_config_and_execs_the_task_runner():
    config = RlConfig(slurm={"setup": ["module load cuda"], "python": "/opt/py/bin/python"})
    job = jobs_by_section(config)["env_worker"]
    script = job_script(config, job, PEER_IDS)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and "module load cuda" in lines
    exec_line = next(line for line in lines if line.startswith("exec "))
    assert exec_line.startswith("exec /opt/py/bin/python -m rlbus.services.launcher.slurm_task env-worker")
    assert "--peer inference=14 --peer monitor=11 --peer orchestrator=12" in exec_line
    body = script.split(f"<<'{CONFIG_END}'\n", 1)[1].rsplit(CONFIG_END, 1)[0]
    assert tomllib.loads(body) == tomllib.loads(job.config_text)
    assert lines[-1] == CONFIG_END


def test_filled_in_config_loads_as_the_services_own(tmp_path):
    job = jobs_by_section(RlConfig(num_env_workers=2))["env_worker"]
    text = fill_placeholders(job.config_text, lambda section, index: f"node-{section}-{index}")
    path = tmp_path / "env-worker.toml"
    path.write_text(text)
    from rlbus.services.env_worker.config import EnvWorkerConfig

    worker = load_config(EnvWorkerConfig, ["@", str(path)], env={})
    assert worker.bus.endpoints.orchestrator_tasks == "tcp://node-orchestrator-0:5550"
    assert worker.inference_urls == ["http://node-inference-0:8000/v1"]


def test_keys_travel_in_the_script_and_unpack_with_their_modes(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run(["python", "-m", "rlbus", "keys", "--out", str(keys)], check=True, capture_output=True,
                   env={**os.environ, "PATH": os.path.dirname(os.sys.executable) + ":" + os.environ["PATH"]})
    originals = {p.relative_to(keys): (p.read_bytes(), p.stat().st_mode & 0o777) for p in keys.rglob("*.key*")}
    lines = key_lines(RlConfig(bus={"curve": {"keys_dir": str(keys)}}))
    for path in keys.rglob("*"):
        if path.is_file():
            path.unlink()  # the node has no copy: only the script brings them
    subprocess.run(["bash", "-euc", "\n".join(lines)], check=True)
    unpacked = {p.relative_to(keys): (p.read_bytes(), p.stat().st_mode & 0o777) for p in keys.rglob("*.key*")}
    assert unpacked == originals and len(unpacked) == 4
    assert unpacked[next(p for p in unpacked if p.name == "server.key_secret")][1] == 0o600
    assert key_lines(RlConfig()) == []


def test_plain_tcp_on_the_nodes_needs_keys_or_a_trusted_network_said_so():
    with pytest.raises(ValueError, match="keys_dir"):
        check_binds_allowed(RlConfig())
    check_binds_allowed(RlConfig(bus={"curve": {"allow_insecure_remote": True}}))


def test_slurm_flags_parse(tmp_path):
    config = load_config(RlConfig, ["--slurm.enabled", "--slurm.trainer.gpus", "4",
                                    "--slurm.extra-args", '["--qos=high"]'], env={})  # fmt: skip
    assert config.slurm.enabled and config.slurm.trainer.gpus == 4 and config.slurm.extra_args == ["--qos=high"]
    with pytest.raises(ConfigError, match="gpus"):
        load_config(RlConfig, ["--slurm.trainer.gpus", "-1"], env={})


def test_slurm_dry_run_writes_submittable_scripts_and_submits_nothing(tmp_path, capsys, monkeypatch):
    from rlbus.services.launcher.main import main

    # The default model, models/tiny, is a local path once ./models exists (after the quickstart):
    # from an empty folder it stays a name, as on a fresh checkout.
    monkeypatch.chdir(tmp_path)

    code = main(["--slurm", "--dry-run", "--output-dir", str(tmp_path / "run"), "--bus.curve.allow-insecure-remote",
                 "--slurm.trainer.gpus", "2", "--num-env-workers", "3"])  # fmt: skip
    assert code == 0
    folder = tmp_path / "run" / "configs" / "slurm"
    assert sorted(p.name for p in folder.glob("*.sbatch")) == [
        "env-worker.sbatch", "inference.sbatch", "monitor.sbatch", "orchestrator.sbatch", "trainer.sbatch"]
    trainer = (folder / "trainer.sbatch").read_text().splitlines()
    assert trainer[0] == "#!/bin/bash" and "#SBATCH --gres=gpu:2" in trainer
    assert "#SBATCH --dependency=after:<monitor-job-id>:<orchestrator-job-id>" in trainer
    assert "#SBATCH --array=0-2" in (folder / "env-worker.sbatch").read_text()
    assert str(folder / "monitor.sbatch") in capsys.readouterr().out
    assert not (tmp_path / "run" / "slurm_jobs.json").exists()
