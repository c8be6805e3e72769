"""``rlbus rl --bench`` and ``rlbus sft --bench``: what bench mode turns off, the folder it needs,
and the table the launcher prints from the run's steps.jsonl."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from rlbus.config import ConfigError, load_config
from rlbus.services.cli import main
from rlbus.services.launcher.run import with_bench_table
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.checks import config_problems
from rlbus.services.trainer.sft_config import SftConfig
from tests.bench_table import parse_bench_table

SFT_DATA = ["--data.synthetic", "reverse-text"]


def model_folder(tmp_path: Path) -> Path:
    """What the checks look at in a model folder (config.json, a tokenizer file); nothing is loaded."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def test_rl_bench_runs_five_steps_with_wandb_checkpoints_resume_and_eval_off():
    flags = ["--bench", "--wandb.enabled", "--trainer.ckpt.enabled", "--trainer.ckpt.resume-step", "-1",
             "--orchestrator.eval.interval", "2", "--trainer.scheduler.warmup-steps", "20"]  # fmt: skip
    config = load_config(RlConfig, flags, env={})
    assert config.max_steps == 5
    assert config.ckpt.interval is None and config.ckpt.resume_step is None
    assert not config.trainer.ckpt.enabled
    assert config.trainer.ckpt.resume_step is None and config.orchestrator.ckpt.resume_step is None
    assert config.orchestrator.eval.interval is None
    assert not config.monitor.wandb.enabled
    assert config.trainer.scheduler.warmup_steps == 5  # a longer warmup is refused at start
    # What each service is started with.
    resolved = config.resolved_configs()
    assert {name: resolved[name].max_steps for name in ("trainer", "orchestrator", "inference", "monitor")} == {
        "trainer": 5, "orchestrator": 5, "inference": 5, "monitor": 5}  # fmt: skip


def test_without_bench_nothing_changes():
    config = load_config(RlConfig, ["--wandb.enabled"], env={})
    assert config.max_steps is None and config.ckpt.interval == 1
    assert config.trainer.ckpt.enabled and config.trainer.ckpt.resume_step == -1 and config.monitor.wandb.enabled


@pytest.mark.parametrize(("given", "steps"), [("3", 3), ("4", 4), ("30", 5)])
def test_rl_bench_takes_a_smaller_max_steps(given, steps):
    assert load_config(RlConfig, ["--bench", "--max-steps", given], env={}).max_steps == steps


def test_rl_bench_refuses_fewer_than_three_steps():
    with pytest.raises(ConfigError, match=r"bench = true with max_steps = 2: the first step is warm-up.*--max-steps 3"):
        load_config(RlConfig, ["--bench", "--max-steps", "2"], env={})


def test_bench_is_a_bare_flag_of_rlbus_rl(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["rl", "--bench", "--model", str(model_folder(tmp_path)), "--output-dir", str(run), "--dry-run"])
    assert code == 0, capsys.readouterr().err
    trainer = tomllib.loads((run / "configs" / "trainer.toml").read_text())
    monitor = tomllib.loads((run / "configs" / "monitor.toml").read_text())
    assert trainer["max_steps"] == 5 and trainer["ckpt"]["enabled"] is False and "resume_step" not in trainer["ckpt"]
    assert monitor["wandb"]["enabled"] is False
    assert tomllib.loads((run / "configs" / "rl.toml").read_text())["bench"] is True


def test_sft_bench_turns_off_checkpoints_final_weights_and_validation():
    flags = ["--bench", *SFT_DATA, "--ckpt.enabled", "--val-interval", "2", "--max-steps", "45"]
    config = load_config(SftConfig, flags, env={})
    assert config.max_steps == 5 and not config.ckpt.enabled and config.ckpt.resume_step is None
    assert not config.save_final and config.val_interval is None
    assert load_config(SftConfig, ["--bench", *SFT_DATA, "--max-steps", "2"], env={}).max_steps == 2
    assert load_config(SftConfig, SFT_DATA, env={}).save_final  # unchanged without --bench


def test_bench_needs_a_folder_without_a_run(tmp_path):
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)  # what a --dry-run leaves: still fresh
    (run / ".rlbus-run").write_text("")
    base = ["--bench", "--model", str(model_folder(tmp_path)), "--output-dir", str(run)]
    assert config_problems(load_config(RlConfig, base, env={})) == []
    (run / "steps.jsonl").write_text('{"step": 1}\n')
    [problem] = config_problems(load_config(RlConfig, base, env={}))
    assert problem.key == "output_dir" and "holds a run (steps.jsonl)" in problem.fix
    assert "--clean-output-dir" in problem.fix
    assert config_problems(load_config(RlConfig, [*base, "--clean-output-dir"], env={})) == []
    assert config_problems(load_config(RlConfig, base[1:], env={})) == []  # only bench mode asks
    [problem] = config_problems(load_config(SftConfig, ["--bench", *SFT_DATA, "--output-dir", str(run)], env={}))
    assert problem.key == "output_dir" and "--clean-output-dir" not in problem.fix


def test_launcher_prints_the_table_of_the_runs_steps_and_keeps_the_exit_code(tmp_path, capsys):
    rows = [{"step": s, "trainer/time/step": t, "trainer/perf/throughput": 100.0 * s, "trainer/perf/mfu": 0.001 * s,
             "trainer/perf/peak_memory": 0.5, "orchestrator/num_completion_tokens/sum": 300.0,
             "orchestrator/time/generate": t} for s, t in [(1, 60.0), (2, 2.0), (3, 3.0)]]  # fmt: skip
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = RlConfig(bench=True, output_dir=tmp_path)
    assert with_bench_table(config, 7) == 7
    table = parse_bench_table(capsys.readouterr().out)
    assert sorted(table.steps) == [1, 2, 3]
    assert table.mean["trainer tok/s"][0] == pytest.approx(250.0)
    assert table.mean["gen tok/s"][0] == pytest.approx((150.0 + 100.0) / 2)
    assert with_bench_table(RlConfig(output_dir=tmp_path), 0) == 0
    assert capsys.readouterr().out == ""  # no table without --bench
