"""``rlbus export-weights``: what it refuses, and where it finds the model's config. (The export of
shards written by 2 ranks, compared with a full save: tests/integration/test_export_weights.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rlbus.errors import UserError
from rlbus.services.cli import main
from rlbus.services.models.tiny import build_tiny_model
from rlbus.services.trainer.checkpoint import CheckpointManager
from rlbus.services.trainer.config import CheckpointConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.export import export_weights
from rlbus.services.trainer.model import load_model, read_hf_weights
from tests.unit.trainer.conftest import tiny_config

SOLO = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def saved_run(model_dir: Path, run: Path, ckpt_format: str = "sharded") -> Path:
    """A run folder with a checkpoint of step 1 (one rank); its step folder."""
    model = load_model(str(model_dir), "float32", SOLO.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    CheckpointManager(run, CheckpointConfig(enabled=True, format=ckpt_format), SOLO).save(1, model, optimizer, None, {})
    return run / "checkpoints" / "step_1"


def test_without_model_the_config_comes_from_the_runs_weights_then_its_trainer_config(tiny_model_dir, tmp_path):
    step = saved_run(tiny_model_dir, tmp_path / "run")
    out = export_weights(step / "shards", tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "run/weights/step_1/model.safetensors").read_bytes()
    # Weights pruned away: the model named by the run's resolved trainer config.
    shutil.rmtree(tmp_path / "run" / "weights")
    (tmp_path / "run" / "configs").mkdir()
    (tmp_path / "run" / "configs" / "trainer.toml").write_text(f'model = "{tiny_model_dir}"\n')
    again = export_weights(step, tmp_path / "again")
    assert read_hf_weights(again).keys() == read_hf_weights(out).keys()
    assert (again / "tokenizer_config.json").is_file()  # the model folder has a tokenizer; the weights had none
    (tmp_path / "run" / "configs" / "trainer.toml").write_text('model = "Qwen/Qwen3-0.6B"\n')  # no local folder
    with pytest.raises(UserError, match="no config.json for the model of .*pass --model"):
        export_weights(step, tmp_path / "third")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no checkpoint at"),
        ("file", "is a file, not a checkpoint folder"),
        ("full", r"is a full checkpoint \(ckpt.format = full\)"),
        ("weights", "is not a sharded checkpoint: it has no shards/ folder"),
        ("no-metadata", "lacks .metadata: the write did not finish"),
        ("bad-metadata", "cannot be read .*not a DCP checkpoint"),
        ("lost-shard", "lacks __0_0.distcp: copy every rank's files into it"),
        ("partial", "still being written, or left half-written"),
    ],
)  # fmt: skip
def test_a_folder_that_is_no_complete_sharded_checkpoint_is_named(tiny_model_dir, tmp_path, case, message):
    step = saved_run(tiny_model_dir, tmp_path / "run")
    target = {"missing": tmp_path / "nope", "file": step / "progress.json", "weights": tmp_path / "run/weights/step_1",
              "partial": step.with_name("step_1.partial")}.get(case, step)  # fmt: skip
    if case == "full":
        target = saved_run(tiny_model_dir, tmp_path / "full", ckpt_format="full")
    elif case == "no-metadata":
        (step / "shards" / ".metadata").unlink()
    elif case == "bad-metadata":
        (step / "shards" / ".metadata").write_bytes(b"not a pickle")
    elif case == "lost-shard":
        (step / "shards" / "__0_0.distcp").unlink()
    elif case == "partial":
        shutil.copytree(step, target)
    with pytest.raises(UserError, match=message):
        export_weights(target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_that_does_not_fit_the_shards_is_refused(tiny_model_dir, tmp_path):
    step = saved_run(tiny_model_dir, tmp_path / "run")
    wider = tmp_path / "wider"
    build_tiny_model(wider, tiny_config(wider).model_copy(update={"hidden_size": 192}))
    with pytest.raises(UserError, match=r"do not fit the model of .*wider.*model.embed_tokens.weight is \(320, 128\)"):
        export_weights(step, tmp_path / "out", model=str(wider))
    with pytest.raises(UserError, match="no model folder at"):
        export_weights(step, tmp_path / "out", model=str(tmp_path / "typo"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_command_refuses_a_used_output_folder_and_reports_on_stderr(tiny_model_dir, tmp_path, capsys):
    step = saved_run(tiny_model_dir, tmp_path / "run")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    capsys.readouterr()  # the progress bars of the save above
    assert main(["export-weights", str(step), str(tmp_path / "used")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rlbus export-weights: {tmp_path / 'used'} exists and is not empty"), err
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert main(["export-weights", str(step), str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "empty")
    assert load_model(str(tmp_path / "empty"), "float32", SOLO.device) is not None
