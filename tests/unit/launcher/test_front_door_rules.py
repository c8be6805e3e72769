"""The rules behind the front door's refusals: the eval error threshold, which ``model`` values
are local paths, and which folders ``--clean-output-dir`` may delete."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlbus.config import ConfigError, load_config
from rlbus.errors import UserError
from rlbus.model_path import check_model_path, looks_like_path
from rlbus.services.eval import EvalRunConfig, too_many_errors
from rlbus.services.launcher.run import clean_output_dir
from rlbus.services.run_config import RUN_MARKER, RlConfig, check_cleanable, mark_run_folder

EVAL_ENV = '[{"id": "reverse-text", "num_examples": 10, "rollouts_per_example": 2}]'


def eval_config(*argv: str) -> EvalRunConfig:
    return load_config(EvalRunConfig, ["--eval.env", EVAL_ENV, *argv], env={})


def metrics(errored: int) -> dict[str, float]:
    return {"eval/reverse-text/num_examples": 10.0, "eval/reverse-text/errored_rollouts": float(errored)}


def test_eval_fails_when_errored_rollouts_pass_the_threshold():
    config = eval_config()
    assert config.max_error_fraction == 0.5
    assert too_many_errors(config, metrics(10)) is None  # 10 of 20: at the threshold
    problem = too_many_errors(config, metrics(11))
    assert problem is not None and "11 of 20 rollouts of reverse-text errored" in problem
    assert "\n" not in problem and "--max-error-fraction" in problem
    assert too_many_errors(eval_config("--max-error-fraction", "1"), metrics(20)) is None
    assert too_many_errors(eval_config("--max-error-fraction", "0"), metrics(1)) is not None


@pytest.mark.parametrize(("model", "is_path"), [
    ("./models/tyni", True), ("/abs/model", True), ("~/m", True), ("../m", True), ("a/b/c", True),
    ("Qwen/Qwen3-0.6B", False), ("gpt2", False),
])  # fmt: skip
def test_what_looks_like_a_local_path(model, is_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(model) is is_path


def test_a_misspelt_model_folder_is_refused_without_asking_a_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    check_model_path("models/tiny")
    check_model_path("Qwen/Qwen3-0.6B")  # a hub name: left to the hub
    for wrong in ("models/tyni", "./models/tyni", str(tmp_path / "nope")):
        with pytest.raises(UserError, match=f"no model folder at {wrong}"):
            check_model_path(wrong)


def test_only_a_marked_or_empty_folder_is_cleaned(tmp_path):
    check_cleanable(tmp_path / "new")  # nothing there yet
    (tmp_path / "empty").mkdir()
    check_cleanable(tmp_path / "empty")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep\n")
    with pytest.raises(ValueError, match=f"holds no {RUN_MARKER} marker"):
        clean_output_dir(theirs)
    with pytest.raises(ConfigError, match=f"holds no {RUN_MARKER} marker"):
        load_config(RlConfig, ["--clean-output-dir", "--output-dir", str(theirs)], env={})
    mark_run_folder(theirs)
    clean_output_dir(theirs)
    assert list(Path(theirs).iterdir()) == []
