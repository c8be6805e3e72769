"""The ``rlbus`` command line, run as a real subprocess."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rlbus.services.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = ROOT / "configs" / "quickstart" / "rl.toml"
SERVICE_FILES = {"inference", "trainer", "orchestrator", "env-worker", "monitor"}


def rlbus(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    return subprocess.run(
        [sys.executable, "-m", "rlbus", *args], capture_output=True, text=True, timeout=120,
        cwd=cwd, env={**clean, **(env or {})},
    )


def test_help_lists_every_command():
    result = rlbus("--help")
    assert result.returncode == 0
    for name in ("rl", "inference", "trainer", "orchestrator", "env-worker", "monitor", "sft", "eval", "tail", "model"):
        assert f"\n  {name} " in result.stdout, name
    assert set(COMMANDS) >= {"rl", "model", "tail"}


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "rlbus"
    if not script.exists():
        pytest.skip("rlbus is not installed in this environment (run ./scripts/test.sh)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "orchestrator" in result.stdout


def test_dry_run_writes_each_service_config_and_each_loads_alone(tmp_path):
    result = rlbus("rl", "@", str(QUICKSTART), "--dry-run", "--output-dir", str(tmp_path), "--max-steps", "7")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "configs"
    assert {p.stem for p in folder.glob("*.toml")} == SERVICE_FILES | {"rl"}
    merged = tomllib.loads((folder / "rl.toml").read_text())
    assert merged["max_steps"] == 7  # more than the quickstart's 5 warmup steps, which the check requires
    assert merged["orchestrator"]["batch_size"] == tomllib.loads(QUICKSTART.read_text())["orchestrator"]["batch_size"]
    for service in SERVICE_FILES:
        written = folder / f"{service}.toml"
        again = tmp_path / "again"
        result = rlbus(service, "@", str(written), "--dry-run", "--output-dir", str(again))
        assert result.returncode == 0, (service, result.stderr)
        reloaded = tomllib.loads((again / "configs" / f"{service}.toml").read_text())
        original = tomllib.loads(written.read_text())
        assert {**reloaded, "output_dir": None} == {**original, "output_dir": None}, service
        assert original["max_steps"] == 7 and original["seed"] == merged["seed"]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["rl", "--orchestrator.batch-sise", "8"], {}, "unknown key 'orchestrator.batch_sise' (did you mean 'batch_size'?)"),
        (["rl", "--orchestrator.sampling.temperature", "-1"], {}, "orchestrator.sampling.temperature: Input should be"),
        (["orchestrator", "--batch-size", "x"], {}, "batch_size: Input should be a valid integer"),
        (["rl"], {"RLBUS_ORCHESTRATR__BATCH_SIZE": "8"}, "RLBUS_ORCHESTRATR__BATCH_SIZE: unknown key 'orchestratr'"),
        (["rl", "@", "missing.toml"], {}, "missing.toml does not exist"),
    ],
)
def test_bad_config_exits_2_naming_the_problem(args, env, message, tmp_path):
    result = rlbus(*args, "--output-dir", str(tmp_path), env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "configs").exists()


def test_env_variable_reaches_a_standalone_service(tmp_path):
    env = {"RLBUS_ORCHESTRATOR__BATCH_SIZE": "48", "RLBUS_SEED": "11", "RLBUS_TRAINER__DTYPE": "bfloat16"}
    result = rlbus("orchestrator", "--dry-run", "--output-dir", str(tmp_path), "--rollouts-per-example", "8", env=env)
    assert result.returncode == 0, result.stderr
    written = tomllib.loads((tmp_path / "configs" / "orchestrator.toml").read_text())
    assert (written["batch_size"], written["seed"]) == (48, 11)


def test_unknown_command_suggests_the_closest():
    result = rlbus("orchestrater")
    assert result.returncode == 2 and "did you mean 'orchestrator'?" in result.stderr


def test_command_help_documents_options():
    result = rlbus("orchestrator", "--help")
    assert result.returncode == 0
    assert "--max-async-level" in result.stdout and "ahead of the policy step" in result.stdout
