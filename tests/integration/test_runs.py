"""``rlbus run | list | logs | stop | delete`` with real detached runs (five services, vLLM on CPU).

Every run is the tiny model for 2 steps of 2 examples x 4 rollouts (~30 s alone on a 2-core CPU), on
loopback ports of its own, so several runs share one registry (``$RLBUS_HOME`` in ``tmp_path``) at once.
Also: every seed config in ``configs/examples/`` and what ``rlbus init`` prints finish a run, and runs
streamed to a local Prime platform (:mod:`tests.integration.platform_server`) are each marked once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlbus.config import read_toml
from rlbus.config.base import BusEndpoints
from rlbus.ports import free_loopback_port
from rlbus.services.cli import main
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.runs import process
from rlbus.services.runs.registry import Registry
from tests.integration.platform_server import PlatformServer, first_steps
from tests.integration.run_processes import kill_all, processes_with_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "configs" / "examples"
SMALL = ["--max-steps", "2", "--batch-size", "2", "--rollouts-per-example", "4", "--sampling.max-tokens", "32"]
"""Sizes of every run here, over what the config file says."""
RUN_TIMEOUT_S = 240.0
PLATFORM_KEY = "sk-runs-platform-key-51c2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The quickstart's model shape (configs/quickstart/model.toml): 1M parameters, 512 positions."""
    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(out, TinyModelConfig(out=out, hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=1,
                                                 intermediate_size=512, max_position_embeddings=512))  # fmt: skip


@pytest.fixture
def home(tmp_path, monkeypatch) -> Iterator[Path]:
    """A registry of its own; every run (and any service it left behind) is killed afterwards."""
    home = tmp_path / "home"
    monkeypatch.setenv("RLBUS_HOME", str(home))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    monkeypatch.chdir(ROOT)  # the example configs are named relative to the repository, as a user would
    yield home
    for record in Registry(home).records():
        process.kill(record)
    kill_all("RLBUS_HOME", str(home))


def processes_under(home: Path) -> set[int]:
    """Live processes started with ``RLBUS_HOME=home``: every process of every run of this test."""
    return processes_with_env("RLBUS_HOME", str(home))


def left_behind(home: Path, live_runs: list[int]) -> set[int]:
    """Processes of runs in ``home`` that belong to none of the live runs (wrapper pids ``live_runs``)."""
    found = processes_under(home)
    return found - {pid for run in live_runs for pid in [run, *process.descendants(run)]}


def port_flags() -> list[str]:
    """Every bus endpoint and the inference port on free loopback ports: runs side by side do not collide."""
    flags = []
    for name in BusEndpoints.model_fields:
        flags += [f"--bus.endpoints.{name}", f"tcp://127.0.0.1:{free_loopback_port()}"]
    return [*flags, "--inference.port", str(free_loopback_port())]


def rlbus(capsys, *args: str) -> tuple[int, str, str]:
    """``rlbus ARGS`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def start(capsys, model: Path, config: Path | str, output_dir: Path, *flags: str) -> str:
    """``rlbus run @ config`` with the tiny model, small sizes and ports of its own; the run's id."""
    code, out, err = rlbus(capsys, "run", "@", str(config), "--model", str(model), "--output-dir", str(output_dir),
                           *SMALL, *flags, *port_flags())  # fmt: skip
    assert code == 0, err
    assert out.startswith("started run ") and f"run folder: {output_dir}" in out, out
    return out.split()[2]


def rows(capsys) -> dict[str, dict]:
    code, out, _ = rlbus(capsys, "list", "--json")
    assert code == 0
    return {row["id"]: row for row in json.loads(out)}


def wait_for(capsys, run_id: str, condition, what: str, timeout_s: float = RUN_TIMEOUT_S) -> dict:
    """Poll ``rlbus list --json`` until ``condition(row)``; the row."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = rows(capsys)[run_id]
        if condition(row):
            return row
        if time.monotonic() > deadline:
            console = Path(row["console"])
            tail = console.read_text()[-3000:] if console.is_file() else "(no console)"
            raise AssertionError(f"run {run_id} not {what} after {timeout_s:g}s: {row['status']}\n{tail}")
        time.sleep(1.0)


def wait_status(capsys, run_id: str, status: str, timeout_s: float = RUN_TIMEOUT_S) -> dict:
    return wait_for(capsys, run_id, lambda row: row["status"] == status, status, timeout_s)


def assert_completed(row: dict) -> None:
    assert (row["status"], row["step"], row["max_steps"]) == ("completed", 2, 2), row
    assert row["exit_code"] == 0 and row["reward"] is not None, row


def console_has(row: dict, text: str) -> bool:
    console = Path(row["console"])
    return console.is_file() and text in console.read_text()


def test_concurrent_runs_kill_stop_logs_delete(home, tiny, capsys, tmp_path):
    basic = EXAMPLES / "basic.toml"
    killed = start(capsys, tiny, basic, tmp_path / "killed")
    done = start(capsys, tiny, basic, tmp_path / "done")
    stopped = start(capsys, tiny, basic, tmp_path / "stopped", "--max-steps", "500")
    listed = rows(capsys)
    assert set(listed) == {killed, done, stopped}
    assert all(listed[i]["status"] == "running" for i in listed), listed
    assert listed[stopped]["max_steps"] == 500 and listed[done]["envs"] == ["reverse-text"]

    # kill -9 of the run's whole process group once vLLM serves: failed, and no process of it stays.
    row = wait_for(capsys, killed, lambda r: console_has(r, "serving policy step 0"), "serving", 180)
    os.killpg(row["pid"], signal.SIGKILL)
    assert wait_status(capsys, killed, "failed", 30)["exit_code"] is None
    live = [rows(capsys)[run_id]["pid"] for run_id in (done, stopped)]
    deadline = time.monotonic() + 60
    while left_behind(home, live):  # the launcher's services die with it (parent-death signal)
        assert time.monotonic() < deadline, f"left behind by the killed run: {left_behind(home, live)}"
        time.sleep(1.0)

    # A graceful stop of a run that is training.
    wait_for(capsys, stopped, lambda r: (r["step"] or 0) >= 1, "training")
    code, out, err = rlbus(capsys, "stop", stopped)
    assert code == 0 and f"run {stopped} stopped" in out, (out, err)
    assert rows(capsys)[stopped]["status"] == "stopped"

    # The other one finishes untouched.
    assert_completed(wait_status(capsys, done, "completed"))
    code, table, _ = rlbus(capsys, "list")
    with capsys.disabled():  # shown with -s: the table a user sees
        print(f"\n{table}")
    lines = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert lines[done][3:5] == ["completed", "2/2"] and lines[killed][3] == "failed"
    assert lines[stopped][3] == "stopped", table

    code, out, _ = rlbus(capsys, "logs", done)
    assert code == 0 and "run summary:" in out and "steps done: 2" in out
    assert f"rlbus run {done}: the run ended with exit code 0" in out
    code, out, _ = rlbus(capsys, "logs", done, "--service", "trainer")
    assert code == 0 and f"loaded {tiny} " in out, out[:2000]
    assert all(" trainer " in line for line in out.splitlines() if line[:4].isdigit()), out[:2000]
    code, out, _ = rlbus(capsys, "logs", done, "-n", "1")
    assert code == 0 and out == f"rlbus run {done}: the run ended with exit code 0\n"

    code, out, err = rlbus(capsys, "stop", done)
    assert code == 2 and "not running (completed)" in err, (out, err)
    code, out, err = rlbus(capsys, "delete", done)
    assert code == 0 and f"removed {tmp_path / 'done'}" in out and f"deleted run {done}" in out, (out, err)
    assert not (tmp_path / "done").exists() and done not in rows(capsys)
    code, _, err = rlbus(capsys, "logs", done)
    assert code == 2 and f"no run {done!r}" in err


def test_runs_stream_to_the_prime_platform_and_each_is_marked_once(home, tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.prime/config.json of this machine
    monkeypatch.delenv("PRIME_TEAM_ID", raising=False)
    monkeypatch.setenv("PRIME_API_KEY", PLATFORM_KEY)  # checked before detaching, read by the launcher after
    basic = EXAMPLES / "basic.toml"
    with PlatformServer(api_key=PLATFORM_KEY) as server:
        flags = ("--prime-platform.base-url", server.base_url)
        done = start(capsys, tiny, basic, tmp_path / "done", *flags)
        stopped = start(capsys, tiny, basic, tmp_path / "stopped", "--max-steps", "500", *flags)
        wait_for(capsys, stopped, lambda r: (r["step"] or 0) >= 1, "training")
        code, out, err = rlbus(capsys, "stop", stopped)
        assert code == 0 and f"run {stopped} stopped" in out, (out, err)
        assert_completed(wait_status(capsys, done, "completed"))
    # Both wrappers ended, so both launchers marked their run (or never will): every request is in.
    ids = {name: read_toml(tmp_path / name / "configs" / "monitor.toml")["prime_platform"]["run_id"]
           for name in ("done", "stopped")}  # fmt: skip
    registered = [Path(r.body["run_config"]["output_dir"]).name for r in server.of("register")]
    assert sorted(registered) == ["done", "stopped"] and sorted(ids.values()) == ["run-1", "run-2"], registered
    for name, run_id in ids.items():  # registered before its monitor streamed anything
        registration = next(r for r in server.of("register") if r.body["run_config"]["output_dir"].endswith(name))
        first_row = next(r for r in server.of("metrics") if r.body["run_id"] == run_id)
        assert server.requests.index(registration) < server.requests.index(first_row), name
    assert [s for s in first_steps(server, ids["done"]) if s >= 1] == [1, 2], first_steps(server, ids["done"])
    assert 1 in first_steps(server, ids["stopped"])
    statuses = {name: [r.body for r in server.of("status") if r.path.endswith(f"/{run_id}/status")]
                for name, run_id in ids.items()}  # fmt: skip
    assert statuses == {
        "done": [{"status": "completed"}],
        "stopped": [{"status": "failed", "error_message": "the launcher got SIGTERM: stopping every service"}],
    }  # fmt: skip
    assert len(server.of("status", ok_only=False)) == 2
    holding_key = [p for folder in (tmp_path / "done", tmp_path / "stopped", home) for p in folder.rglob("*")
                   if p.is_file() and PLATFORM_KEY.encode() in p.read_bytes()]  # fmt: skip
    assert holding_key == []


def test_example_configs_finish_a_run(home, tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # only wandb.toml enables W&B
    examples = sorted(path.stem for path in EXAMPLES.glob("*.toml"))
    assert {"basic", "env_args", "eval", "wandb"} <= set(examples), examples
    finished = {}
    for pair in (examples[i : i + 2] for i in range(0, len(examples), 2)):  # two runs at a time
        started = {name: start(capsys, tiny, EXAMPLES / f"{name}.toml", tmp_path / name) for name in pair}
        for name, run_id in started.items():
            finished[name] = wait_status(capsys, run_id, "completed")
            assert_completed(finished[name])
    assert {row["name"] for row in finished.values()} == set(examples) - {"wandb"} | {"reverse-text-tiny"}

    orchestrator = (tmp_path / "env_args" / "configs" / "orchestrator.toml").read_text()
    assert "max_words = 3" in orchestrator and "seed = 1" in orchestrator, orchestrator
    metrics = (tmp_path / "eval" / "metrics.jsonl").read_text()
    assert '"eval/reverse-text/avg@2"' in metrics, metrics[-2000:]
    assert '"eval/reverse-text-greedy/avg@1"' in metrics, metrics[-2000:]
    (wandb_run,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("run-*.wandb")), sorted(wandb_run.iterdir())
    assert "rlbus-examples" in (tmp_path / "wandb" / "configs" / "monitor.toml").read_text()


def test_init_config_runs(home, capsys, tmp_path, tiny):
    code, out, _ = rlbus(capsys, "init", "--model", str(tiny))
    assert code == 0
    config = tmp_path / "my.toml"
    config.write_text(out)
    # The starter warms the learning rate up over 5 steps: longer than these 2, which rlbus run refuses
    # before anything starts (it used to start a run whose trainer then failed).
    code, out, err = rlbus(capsys, "run", "@", str(config), "--output-dir", str(tmp_path / "refused"), *SMALL)
    assert (code, out) == (2, "") and "trainer.scheduler.warmup_steps = 5" in err, err
    assert rows(capsys) == {} and not (tmp_path / "refused").exists()
    run_id = start(capsys, tiny, config, tmp_path / "my-run", "--trainer.scheduler.warmup-steps", "1",
                   "--num-env-workers", "2")  # fmt: skip
    assert_completed(wait_status(capsys, run_id, "completed"))
    code, out, _ = rlbus(capsys, "logs", run_id, "--service", "orchestrator")
    assert code == 0 and "all 2 steps trained" in out, out[-2000:]
    # Both env-workers append to env-worker.log; each one's console is env-worker-<i>.out.
    code, out, _ = rlbus(capsys, "logs", run_id, "--service", "env_worker")
    assert code == 0 and all(f"env-worker env-worker-{i} taking tasks" in out for i in range(2)), out[-2000:]
    code, out, _ = rlbus(capsys, "logs", run_id, "--service", "env-worker-1")
    assert code == 0 and "env-worker-1 taking tasks" in out and "env-worker-0 taking" not in out, out[-2000:]
    code, _, err = rlbus(capsys, "logs", run_id, "--service", "env-worker-2")
    assert code == 2 and "there are: " in err and "env-worker-1, inference" in err, err
