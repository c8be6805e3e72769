"""The launcher's decisions and process table, without processes."""

import signal
import sys
from pathlib import Path

import pytest

from rlbus.config import ConfigError, load_config
from rlbus.services.launcher.processes import describe_exit, process_table, service_command
from rlbus.services.launcher.run import clean_output_dir
from rlbus.services.launcher.supervisor import Phase, RunState
from rlbus.services.run_config import RlConfig, mark_run_folder

SPECS = process_table(RlConfig(num_env_workers=2), Path("out/configs"))


def test_table_starts_the_monitor_first_and_gives_env_workers_distinct_ids():
    assert [spec.name for spec in SPECS] == [
        "monitor", "inference", "trainer", "orchestrator", "env-worker-0", "env-worker-1"]
    workers = [spec for spec in SPECS if spec.service == "env-worker"]
    assert [spec.args for spec in workers] == [("--worker-id", "env-worker-0"), ("--worker-id", "env-worker-1")]
    assert {spec.config_path for spec in workers} == {Path("out/configs/env-worker.toml")}
    assert [spec.name for spec in SPECS if spec.to_console] == ["monitor"]


def test_service_command_is_what_a_user_runs_by_hand():
    worker = SPECS[-1]
    assert service_command(worker) == [sys.executable, "-m", "rlbus", "env-worker", "@",
                                       "out/configs/env-worker.toml", "--worker-id", "env-worker-1"]  # fmt: skip


def test_orchestrator_exit_0_ends_the_run_successfully():
    state = RunState(SPECS)
    assert state.on_exit("orchestrator", 0) is True
    assert (state.result.exit_code, state.result.failed, state.phase) == (0, None, Phase.STOPPING)
    assert "orchestrator finished" in state.result.reason
    # What exits while stopping does not change the outcome.
    assert state.on_exit("inference", -15) is False and state.result.exit_code == 0


def test_trainer_exit_0_lets_the_run_go_on():
    state = RunState(SPECS)
    assert state.on_exit("trainer", 0) is False
    assert state.phase is Phase.RUNNING and state.result is None


@pytest.mark.parametrize(
    ("name", "code", "reason"),
    [
        ("trainer", 3, "trainer exited with code 3"),
        ("inference", 0, "inference exited with code 0 while it should keep running"),
        ("env-worker-1", -9, "env-worker-1 was killed by SIGKILL"),
        ("monitor", 1, "monitor exited with code 1"),
    ],
)
def test_any_other_exit_fails_the_run_naming_the_service(name, code, reason):
    state = RunState(SPECS)
    assert state.on_exit(name, code) is True
    assert (state.result.exit_code, state.result.failed, state.result.reason) == (1, name, reason)


def test_first_signal_stops_gracefully_and_the_second_kills():
    state = RunState(SPECS)
    assert state.on_signal(signal.SIGINT) is True
    assert (state.result.exit_code, state.phase) == (130, Phase.STOPPING)
    assert state.on_signal(signal.SIGINT) is True and state.phase is Phase.KILLING


def test_sigterm_exit_code_is_143():
    state = RunState(SPECS)
    state.on_signal(signal.SIGTERM)
    assert state.result.exit_code == 143 and "SIGTERM" in state.result.reason


def test_describe_exit_names_signals():
    assert describe_exit(0) == "exited with code 0" and describe_exit(-15) == "was killed by SIGTERM"


def test_clean_output_dir_refuses_home_cwd_and_their_parents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in (Path("/"), Path.home(), Path("."), tmp_path.parent):
        with pytest.raises(ValueError, match="refusing to clean output_dir"):
            clean_output_dir(bad)
        with pytest.raises(ConfigError, match="refusing to clean output_dir"):
            load_config(RlConfig, ["--clean-output-dir", "--output-dir", str(bad)], env={})
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    mark_run_folder(run)  # what every rlbus command writes into its run folder
    clean_output_dir(run)
    assert run.is_dir() and list(run.iterdir()) == []


def test_a_failed_service_is_restarted_only_while_restarts_are_left():
    state = RunState(SPECS, max_restarts=2)
    assert state.should_restart("inference", -9) and state.should_restart("inference", 1)
    assert not state.should_restart("inference", -9)
    assert not state.should_restart("trainer", 0)  # its part is done: nothing to restart
    assert state.should_restart("trainer", -9) and state.phase is Phase.RUNNING
