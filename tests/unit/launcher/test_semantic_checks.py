"""``rlbus rl`` refuses, before anything starts, what used to fail only after vLLM started.

Each bad input goes through the real CLI entry in-process (the function the ``rlbus`` console
script calls): exit code 2, one stderr line naming the key, and no run folder made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rlbus.services.cli import main
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.checks import Problem, config_problems
from tests.unit.launcher.test_cli import QUICKSTART, ROOT
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture: max_position_embeddings 512)

SHIPPED_RL = [
    *sorted((ROOT / "configs").rglob("rl.toml")),
    *sorted((ROOT / "configs" / "examples").glob("*.toml")),
    ROOT / "compose" / "rl.toml",
]
ENV = "--orchestrator.train.env"

# (test id, extra flags, key the one stderr line must name, words it must contain)
BAD_INPUTS = [
    ("unknown-env-id", [ENV, '[{"id": "revers-text"}]'], "orchestrator.train.env[0].id", "did you mean 'reverse-text'"),
    ("unknown-env-arg", [ENV, '[{"id": "reverse-text", "args": {"min_wordz": 2}}]'], "orchestrator.train.env[0].args",
     "did you mean 'min_words'"),
    ("env-args-refused", [ENV, '[{"id": "reverse-text", "args": {"min_words": 5, "max_words": 2}}]'],
     "orchestrator.train.env[0].args", "min_words <= max_words"),
    ("unknown-eval-env", ["--orchestrator.eval.env", '[{"id": "nope"}]'], "orchestrator.eval.env[0].id",
     "unknown environment"),
    ("unknown-env-prefix", [ENV, '[{"id": "nosuch:env"}]'], "orchestrator.train.env[0].id", "no loader for the prefix"),
    ("model-missing", ["--model", "{tmp}/no-model"], "model", "no such folder"),
    ("model-not-a-model", ["--model", "{tmp}"], "model", "no config.json"),
    ("model-without-tokenizer", ["--model", "{no_tokenizer}"], "model", "no tokenizer"),
    ("temperature-0", ["--orchestrator.sampling.temperature", "0"], "orchestrator.sampling.temperature", "above 0"),
    ("http-port-on-bus-port", ["--inference.port", "5550"], "inference.port", "bus.endpoints.orchestrator_tasks"),
    ("two-endpoints-one-port", ["--bus.endpoints.monitor-view", "tcp://127.0.0.1:5555"],
     "bus.endpoints.monitor_view", "bus.endpoints.monitor_telemetry"),
    ("wildcard-host-port", ["--bus.endpoints.trainer-weights", "tcp://0.0.0.0:8000"], "inference.port",
     "bus.endpoints.trainer_weights"),
    ("dashboard-on-inference-port", ["--monitor.dashboard", "127.0.0.1:8000"], "monitor.dashboard",
     "inference.port"),
    ("max-model-len-over-model", ["--inference.max-model-len", "1024"], "inference.max_model_len", "512"),
    ("max-tokens-fill-context", ["--orchestrator.sampling.max-tokens", "512"], "orchestrator.sampling.max_tokens",
     "inference.max_model_len = 512"),
    ("resume-after-max-steps", ["--ckpt.resume-step", "20", "--max-steps", "10"], "ckpt.resume_step",
     "max_steps = 10"),
    ("section-resume-after-max-steps", ["--trainer.ckpt.resume-step", "20", "--max-steps", "10"],
     "trainer.ckpt.resume_step", "max_steps = 10"),
    ("warmup-after-max-steps", ["--trainer.scheduler.warmup-steps", "5", "--max-steps", "2"],
     "trainer.scheduler.warmup_steps", "max_steps = 2"),
    ("clean-and-resume", ["--clean-output-dir", "--ckpt.resume-step", "5"], "ckpt.resume_step", "--clean-output-dir"),
]  # fmt: skip


@pytest.fixture(autouse=True)
def no_rlbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's RLBUS_* variables must not change what the CLI reads.
    for name in [name for name in os.environ if name.startswith("RLBUS_")]:
        monkeypatch.delenv(name)


def rl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of ``rlbus rl ...`` run in this process."""
    capsys.readouterr()
    code = main(["rl", *args])
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(("flags", "key", "words"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])  # fmt: skip
def test_bad_input_exits_2_with_one_line_naming_the_key(flags, key, words, tiny_model_dir, tmp_path,  # noqa: F811
                                                        capsys):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_tokenizer)
    flags = [flag.replace("{tmp}", str(tmp_path)).replace("{no_tokenizer}", str(no_tokenizer)) for flag in flags]
    output_dir = tmp_path / "run"
    code, lines = rl(capsys, "@", str(QUICKSTART), "--model", str(tiny_model_dir), "--output-dir", str(output_dir),
                     *flags, "--dry-run")  # fmt: skip
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"rlbus rl: {key} = "), lines[0]
    assert words in lines[0]
    assert not output_dir.exists()  # nothing started, not even the run folder


def test_a_real_run_is_refused_before_it_starts(tiny_model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    started = []  # a stand-in for the launcher: should the check ever miss, no service starts here
    monkeypatch.setattr("rlbus.services.launcher.run.run_rl", lambda config: started.append(config) or 0)
    output_dir = tmp_path / "run"
    code, lines = rl(capsys, "@", str(QUICKSTART), "--model", str(tiny_model_dir), "--output-dir", str(output_dir),
                     "--orchestrator.sampling.temperature", "0")  # fmt: skip
    assert (code, len(lines), started) == (2, 1, []), lines
    assert not output_dir.exists()  # not even logs/


def test_several_problems_are_all_named(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    code, lines = rl(capsys, "@", str(QUICKSTART), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "r"),
                     "--orchestrator.sampling.temperature", "0", "--inference.port", "5550", "--dry-run")  # fmt: skip
    assert code == 2
    assert lines[0] == "rlbus rl: 2 problems before start:"
    assert [line.split(" = ")[0].strip() for line in lines[1:]] == ["orchestrator.sampling.temperature",
                                                                     "inference.port"]  # fmt: skip


@pytest.mark.parametrize("path", SHIPPED_RL, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_rl_config_passes_the_checks(path, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    # Local model paths (models/quickstart, compose's /rlbus/model) exist only after setup: the tiny
    # model stands in. A hub id (Qwen/...) is kept: it is not checked without a network.
    model = tomllib.loads(path.read_text())["model"]
    flags = [] if not model.startswith(("/", "models/")) else ["--model", str(tiny_model_dir)]
    code, lines = rl(capsys, "@", str(path), *flags, "--output-dir", str(tmp_path / "run"), "--dry-run")
    assert (code, lines) == (0, [])


def test_eval_may_sample_greedily_and_problems_print_as_key_value_fix():
    from rlbus.services.eval import EvalRunConfig

    assert config_problems(EvalRunConfig(sampling={"temperature": 0.0}, output_dir=Path("x"))) == []
    problem = Problem("inference.port", 5550, "taken; pick another")
    assert str(problem) == "inference.port = 5550: taken; pick another"


def test_a_hub_id_is_not_checked_but_a_local_path_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _model_keys(RlConfig(model="Qwen/Qwen3-0.6B", output_dir=tmp_path)) == []
    (tmp_path / "models").mkdir()  # now models/tiny can only be a local folder, and it is missing
    assert _model_keys(RlConfig(model="models/tiny", output_dir=tmp_path)) == ["model"]
    (tmp_path / "models" / "tiny").mkdir()
    (tmp_path / "models" / "tiny" / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    (tmp_path / "models" / "tiny" / "tokenizer.json").write_text("{}")
    assert _model_keys(RlConfig(model="models/tiny", output_dir=tmp_path)) == []


def _model_keys(config: RlConfig) -> list[str]:
    return [problem.key for problem in config_problems(config) if problem.key == "model"]


def test_the_checks_import_no_torch_vllm_or_transformers(tiny_model_dir):  # noqa: F811
    # Every built-in environment's module is imported to check its arguments: still nothing heavy.
    code = (
        "import sys; from pathlib import Path; from rlbus.services.run_config import RlConfig;"
        "from rlbus.services.run_config.checks import config_problems;"
        "envs = [{'id': name} for name in ('reverse-text', 'arithmetic', 'calculator', 'guess-number')];"
        f"config_problems(RlConfig(model={str(tiny_model_dir)!r}, orchestrator={{'eval': {{'env': envs}}}}));"
        "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
