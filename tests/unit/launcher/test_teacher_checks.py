"""``rlbus rl`` with a teacher (``training_mode`` opd / sft): what it refuses before anything starts,
asked of a real HTTP server standing in for the teacher, and where the teacher's settings go."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import pytest

from rlbus.services.cli import main
from rlbus.services.models.tokenizer import build_core_tokenizer
from tests.teacher_server import MODEL, TeacherBehaviour, serve_teacher
from tests.unit.launcher.test_cli import QUICKSTART
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture)

KEY = "orchestrator.teacher.client.base_url"


@pytest.fixture(autouse=True)
def no_rlbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("RLBUS_")]:
        monkeypatch.delenv(name)


def rl(capsys: pytest.CaptureFixture[str], model: Path, out: Path, mode: str, url: str | None,
       *flags: str) -> tuple[int, list[str]]:  # fmt: skip
    """Exit code and stderr lines of ``rlbus rl --dry-run`` in ``mode`` with the teacher at ``url``."""
    teacher = (
        [] if url is None else ["--orchestrator.teacher", f'{{"client": {{"base_url": "{url}", "model": "{MODEL}"}}}}']
    )
    capsys.readouterr()
    code = main(["rl", "@", str(QUICKSTART), "--model", str(model), "--output-dir", str(out), "--orchestrator.training-mode",
                 mode, *teacher, *flags, "--dry-run"])  # fmt: skip
    return code, capsys.readouterr().err.splitlines()


def other_tokenizer_model(model: Path, folder: Path, multiple: int) -> Path:
    """The tiny model with a tokenizer that cuts text alike but has another vocabulary size."""
    shutil.copytree(model, folder)
    build_core_tokenizer(multiple).save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("mode", ["opd", "sft"])
def test_a_teacher_that_can_do_the_job_passes_and_env_workers_get_it(mode, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    with serve_teacher(TeacherBehaviour()) as url:
        code, lines = rl(capsys, tiny_model_dir, tmp_path / "run", mode, url,
                         "--orchestrator.teacher.client.api-key", "sk-teacher")  # fmt: skip
    assert (code, lines) == (0, [])
    worker = tomllib.loads((tmp_path / "run" / "configs" / "env-worker.toml").read_text())
    assert worker["teacher"]["base_url"] == url and worker["teacher"]["model"] == MODEL
    assert "sk-teacher" not in (tmp_path / "run" / "configs" / "env-worker.toml").read_text()


@pytest.mark.parametrize("mode", ["opd", "sft"])
def test_a_mode_without_a_teacher_is_refused(mode, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    code, lines = rl(capsys, tiny_model_dir, tmp_path / "run", mode, None)
    assert code == 2 and len(lines) == 1 and f"training_mode = '{mode}' needs a teacher" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_a_teacher_without_prompt_logprobs_is_refused_naming_its_url(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    with serve_teacher(TeacherBehaviour(prompt_logprobs=False)) as url:
        code, lines = rl(capsys, tiny_model_dir, tmp_path / "run", "opd", url)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"rlbus rl: {KEY} = '{url}': {url}/completions answered without "
                               "choices[0].prompt_logprobs: the teacher must return prompt logprobs"), lines[0]  # fmt: skip
    # The same teacher can still generate for sft, which needs no logprobs.
    with serve_teacher(TeacherBehaviour(prompt_logprobs=False)) as url:
        assert rl(capsys, tiny_model_dir, tmp_path / "run-sft", "sft", url) == (0, [])


# 128: the student's ids go up to 383, the teacher's (320 of them) stop at 319; 32: the other way round.
@pytest.mark.parametrize(("multiple", "words"), [
    # The student's special tokens from <|reserved_61|> on are plain text to the teacher.
    (128, ("is tokenized as [60, 124, 114, 101, 115, 101] by the teacher and [320, 321, 322, 323, 324, 325] by "
           "the student (from token 64)")),
    (32, "the student's vocabulary has 288 tokens, the teacher decodes id 288 too (to '<|reserved_29|>')"),
])  # fmt: skip
def test_a_teacher_with_another_tokenizer_is_refused_naming_both(multiple, words, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    student = other_tokenizer_model(tiny_model_dir, tmp_path / "student", multiple)
    with serve_teacher(TeacherBehaviour()) as url:
        code, lines = rl(capsys, student, tmp_path / "run", "opd", url)
    assert code == 2 and len(lines) == 1, lines
    assert f"the teacher '{MODEL}' at {url} does not use the tokenizer of the student '{student}'" in lines[0]
    assert words in lines[0], lines[0]


def test_an_unreachable_teacher_is_refused(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    with serve_teacher(TeacherBehaviour()) as url:
        pass  # the port is closed again
    for mode in ("opd", "sft"):
        code, lines = rl(capsys, tiny_model_dir, tmp_path / mode, mode, url)
        assert code == 2 and len(lines) == 1 and "cannot reach the teacher at" in lines[0], lines


def test_an_orchestrator_started_alone_checks_its_teacher_too(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    with serve_teacher(TeacherBehaviour(prompt_logprobs=False)) as url:
        teacher = f'{{"client": {{"base_url": "{url}", "model": "{MODEL}"}}}}'
        capsys.readouterr()
        code = main(["orchestrator", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
                     "--training-mode", "opd", "--teacher", teacher, "--dry-run"])  # fmt: skip
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"rlbus orchestrator: teacher.client.base_url = '{url}': {url}/completions answered "
                               "without choices[0].prompt_logprobs"), lines[0]  # fmt: skip
