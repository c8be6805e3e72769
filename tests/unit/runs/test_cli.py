"""``rlbus run | list | logs | stop | delete | models`` in-process, with real detached processes.

``rlbus run`` starts the real wrapper in a session of its own; only ``rlbus rl`` itself is
replaced by a cheap Python child (``RL_COMMAND``), so stopping, killing and exit records are real.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from rlbus.services.cli import main
from rlbus.services.runs import cli as runs_cli
from rlbus.services.runs.registry import Registry

SLEEPER = "import sys, time; print('args', *sys.argv[1:], flush=True); time.sleep(60)"
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")  # fmt: skip


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RLBUS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"], "max_position_embeddings": 4096}')
    (model / "tokenizer.json").write_text("{}")
    (tmp_path / "rl.toml").write_text(f'model = "{model}"\noutput_dir = "out"\nmax_steps = 3\n')
    return tmp_path / "home"


@pytest.fixture
def runs(home):
    """Stop whatever a test left running."""
    yield Registry(home)
    for record in Registry(home).records():
        if record.pid and runs_cli.process.is_alive(record):
            runs_cli.process.kill(record)


def start(capsys, monkeypatch, script: str, *flags: str) -> str:
    monkeypatch.setattr(runs_cli, "RL_COMMAND", [sys.executable, "-c", script])
    assert main(["run", "@", "rl.toml", *flags]) == 0
    out = capsys.readouterr().out
    assert "follow it:  rlbus logs -f" in out
    return out.split()[2]


def status(capsys, run_id: str) -> dict:
    assert main(["list", "--json"]) == 0
    return next(row for row in json.loads(capsys.readouterr().out) if row["id"] == run_id)


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def console_has(runs: Registry, run_id: str, text: str) -> bool:
    path = Path(runs.load(run_id).console)
    return path.is_file() and text in path.read_text()


def test_run_list_logs_stop_delete(runs, capsys, monkeypatch, tmp_path):
    run_id = start(capsys, monkeypatch, SLEEPER, "--max-steps", "2")
    assert len(run_id) == 8
    wait_for(lambda: console_has(runs, run_id, "args @ rl.toml --max-steps 2"))
    row = status(capsys, run_id)
    assert (row["status"], row["max_steps"], row["model"]) == ("running", 2, str(tmp_path / "model"))
    assert row["output_dir"] == str(tmp_path / "out") and row["envs"] == ["reverse-text"]
    assert main(["list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "NAME", "MODEL", "STATUS", "STEP", "REWARD", "STARTED", "DURATION"]
    # Long model paths are cut from the left: their ends tell them apart.
    assert table[1].split()[:5] == [run_id, "out", "…" + str(tmp_path / "model")[-31:], "running", "-/2"]

    assert main(["logs", run_id[:4]]) == 0
    assert "args @ rl.toml --max-steps 2" in capsys.readouterr().out
    assert main(["stop", run_id]) == 0
    assert f"run {run_id} stopped" in capsys.readouterr().out
    assert status(capsys, run_id)["status"] == "stopped"
    assert main(["stop", run_id]) == 2
    assert f"run {run_id} is not running (stopped)" in capsys.readouterr().err

    assert main(["delete", run_id]) == 0
    assert not (tmp_path / "out").exists() and runs.ids() == []


def test_a_config_error_exits_2_and_starts_nothing(runs, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(runs_cli, "RL_COMMAND", [sys.executable, "-c", SLEEPER])
    assert main(["run", "@", "rl.toml", "--max-steps", "0"]) == 2
    assert "max_steps" in capsys.readouterr().err
    assert main(["run", "@", "rl.toml", "--model", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert runs.ids() == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("code", "expected"), [(0, "completed"), (3, "failed")])
def test_the_wrapper_records_the_exit_code(runs, capsys, monkeypatch, code, expected):
    run_id = start(capsys, monkeypatch, f"import sys; sys.exit({code})")
    wait_for(lambda: runs.load(run_id).exit_code is not None)
    row = status(capsys, run_id)
    assert (row["status"], row["exit_code"]) == (expected, code)
    assert main(["stop", run_id]) == 2
    assert f"is not running ({expected})" in capsys.readouterr().err


def test_a_run_killed_without_cleanup_is_failed(runs, capsys, monkeypatch):
    run_id = start(capsys, monkeypatch, SLEEPER)
    record = runs.load(run_id)
    os.killpg(record.pid, signal.SIGKILL)  # wrapper and child at once: nobody records an exit
    wait_for(lambda: not runs_cli.process.is_alive(record))
    row = status(capsys, run_id)
    assert (row["status"], row["exit_code"]) == ("failed", None)


def test_a_second_stop_kills_a_run_that_ignores_sigterm(runs, capsys, monkeypatch):
    run_id = start(capsys, monkeypatch, STUBBORN)
    wait_for(lambda: console_has(runs, run_id, "ready"))
    assert main(["stop", run_id, "--timeout", "0.5"]) == 1
    assert f"'rlbus stop {run_id}' again kills it" in capsys.readouterr().out
    assert status(capsys, run_id)["status"] == "stopping"
    assert main(["stop", run_id]) == 0
    assert "killed" in capsys.readouterr().out
    assert status(capsys, run_id)["status"] == "stopped"


def test_an_unknown_id_suggests_the_closest(runs, capsys, monkeypatch):
    run_id = start(capsys, monkeypatch, "pass")
    typo = run_id[:-1] + ("0" if run_id[-1] != "0" else "1")
    for command in ("stop", "logs", "delete"):
        assert main([command, typo]) == 2
        assert f"did you mean '{run_id}'?" in capsys.readouterr().err


def test_delete_refuses_a_running_run_without_force(runs, capsys, monkeypatch, tmp_path):
    run_id = start(capsys, monkeypatch, SLEEPER)
    assert main(["delete", run_id]) == 2
    assert "is still running" in capsys.readouterr().err
    record = runs.load(run_id)
    assert main(["delete", run_id, "--force"]) == 0
    assert not runs_cli.process.is_alive(record) and runs.ids() == [] and not (tmp_path / "out").exists()


def test_delete_keeps_a_folder_rlbus_did_not_mark(runs, capsys, monkeypatch, tmp_path):
    run_id = start(capsys, monkeypatch, "pass")
    wait_for(lambda: runs.load(run_id).exit_code is not None)
    (tmp_path / "out" / ".rlbus-run").unlink()
    assert main(["delete", run_id]) == 0
    assert "holds no .rlbus-run marker" in capsys.readouterr().out
    assert (tmp_path / "out").is_dir() and runs.ids() == []


def test_logs_follow_until_the_end_and_service_logs(runs, capsys, monkeypatch, tmp_path):
    script = "import time\nfor i in range(3):\n    print('line', i, flush=True); time.sleep(0.3)"
    run_id = start(capsys, monkeypatch, script)
    assert main(["logs", "-f", run_id]) == 0
    out = capsys.readouterr().out
    assert "line 0" in out and "line 2" in out and "ended with exit code 0" in out
    (tmp_path / "out" / "logs" / "trainer.log").write_text("step 1 | loss 0.5\n")
    assert main(["logs", run_id, "--service", "trainer"]) == 0
    assert capsys.readouterr().out == "step 1 | loss 0.5\n"
    assert main(["logs", run_id, "--service", "traner"]) == 2
    assert "(did you mean 'trainer'? there are: trainer)" in capsys.readouterr().err


def test_models_lists_local_folders_and_the_hub_cache(home, capsys, monkeypatch, tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"]}')
    (tmp_path / "models" / "empty").mkdir()
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["models", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(m["model"], m["architecture"]) for m in found["models"]] == [
        ("models/tiny", "Qwen3ForCausalLM"), ("HuggingFaceTB/SmolLM2-135M", "llama")]  # fmt: skip
    assert set(found["buildable"]) == {"tiny", "smollm2"}
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "ARCHITECTURE", "SIZE", "WHERE"]
    assert lines[1].split() == ["models/tiny", "Qwen3ForCausalLM", "39", "B", "./models"]


def test_clean_output_dir_is_done_before_detaching(runs, capsys, monkeypatch, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("stale")
    assert main(["run", "@", "rl.toml", "--clean-output-dir"]) == 2  # no marker: not rlbus's folder
    assert "holds no .rlbus-run marker" in capsys.readouterr().err
    (tmp_path / "out" / ".rlbus-run").write_text("")
    run_id = start(capsys, monkeypatch, SLEEPER, "--clean-output-dir")
    # The launcher must not clean again: it would delete the console file the run writes to.
    wait_for(lambda: console_has(runs, run_id, "args @ rl.toml --clean-output-dir --no-clean-output-dir"))
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / ".rlbus-run").is_file()


class Recorder(io.StringIO):
    """A stdout another thread writes to while the test reads it (capsys's reads truncate)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            return super().write(text)

    def text(self) -> str:
        with self.lock:
            return self.getvalue()


def test_logs_of_a_service_follow_each_of_its_files(runs, capsys, monkeypatch, tmp_path):
    # Two env-workers' consoles, the second appearing while the logs are followed (SLURM-like layout).
    # The child writes line i only once the test saw line i-1 printed (it creates out/go-i), so the
    # order of events does not depend on how fast either side runs.
    script = ("import pathlib, time\nlogs = pathlib.Path('out/logs')\nfor i in range(4):\n"
              "    while i and not pathlib.Path(f'out/go-{i}').exists(): time.sleep(0.02)\n"
              "    with (logs / f'env-worker-{i % 2}.out').open('a') as f: f.write(f'line {i}\\n')")  # fmt: skip
    run_id = start(capsys, monkeypatch, script)
    wait_for(lambda: (tmp_path / "out" / "logs" / "env-worker-0.out").is_file())
    recorder, result = Recorder(), []
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", recorder)
        follower = threading.Thread(
            target=lambda: result.append(main(["logs", "-f", run_id, "--service", "env_worker"]))
        )
        follower.start()
        for i in range(1, 4):
            wait_for(lambda line=f"line {i - 1}\n": line in recorder.text())
            (tmp_path / "out" / f"go-{i}").write_text("")
        follower.join(timeout=60)
    assert result == [0]
    first, second = (f"==> {tmp_path / 'out' / 'logs' / f'env-worker-{i}.out'} <==" for i in range(2))
    assert recorder.text() == f"line 0\n\n{second}\nline 1\n\n{first}\nline 2\n\n{second}\nline 3\n"
    assert main(["logs", run_id, "--service", "env-worker-1"]) == 0
    assert capsys.readouterr().out == "line 1\nline 3\n"
    assert main(["logs", run_id, "--service", "inference"]) == 2
    assert "there are: env-worker, env-worker-0, env-worker-1)" in capsys.readouterr().err
