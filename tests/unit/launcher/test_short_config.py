"""The short run config of Prime's hosted RL (services/run_config/short.py) through the real entry.

Each case runs ``rlbus rl @ file --dry-run`` in-process and reads back the resolved configs it
wrote to ``<output_dir>/configs/``: the short keys must land on the full ones.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from rlbus.config import load_config
from rlbus.config.base import REDACTED
from rlbus.services.cli import main
from rlbus.services.run_config import RlConfig, service_env
from rlbus.services.run_config.short import SHORT_KEYS
from tests.unit.launcher.test_cli import ROOT
from tests.unit.trainer.conftest import tiny_model_dir  # noqa: F401  (session fixture: max_position_embeddings 512)

EXAMPLE = """\
model = "{model}"
output_dir = "{output_dir}"
max_steps = 100
batch_size = 8
rollouts_per_example = 2
[sampling]
max_tokens = 128
temperature = 0.8
[[env]]
id = "reverse-text"
name = "my-run"
args = {{ min_words = 1 }}
[eval]
interval = 50
[[eval.env]]
id = "reverse-text"
num_examples = 10
rollouts_per_example = 2
[wandb]
project = "my-rl-project"
entity = "my-team"
name = "experiment-1"
"""


@pytest.fixture(autouse=True)
def no_rlbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's RLBUS_* variables and W&B key must not change what the CLI reads.
    for name in [name for name in os.environ if name.startswith("RLBUS_") or name == "WANDB_API_KEY"]:
        monkeypatch.delenv(name)


def example(tmp_path: Path, model: Path, extra: str = "") -> Path:
    path = tmp_path / "short.toml"
    path.write_text(EXAMPLE.format(model=model, output_dir=tmp_path / "run") + extra)
    return path


def rl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of ``rlbus rl ... --dry-run`` run in this process."""
    capsys.readouterr()
    code = main(["rl", *args, "--dry-run"])
    return code, capsys.readouterr().err.splitlines()


def resolved(tmp_path: Path, stem: str = "rl") -> dict:
    return tomllib.loads((tmp_path / "run" / "configs" / f"{stem}.toml").read_text())


def test_the_hosted_example_lands_on_the_full_keys(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    assert rl(capsys, "@", str(example(tmp_path, tiny_model_dir))) == (0, [])
    config = resolved(tmp_path)
    orchestrator = config["orchestrator"]
    assert config["max_steps"] == 100
    # Short batch_size counts examples; the orchestrator's counts rollouts.
    assert (orchestrator["batch_size"], orchestrator["rollouts_per_example"]) == (16, 2)
    assert orchestrator["sampling"] | {"top_p": 1.0} == {"max_tokens": 128, "temperature": 0.8, "top_p": 1.0}
    assert orchestrator["train"]["env"] == [{"id": "reverse-text", "args": {"min_words": 1}, "ratio": 1.0}]
    assert orchestrator["eval"]["interval"] == 50
    assert orchestrator["eval"]["env"] == [
        {"id": "reverse-text", "args": {}, "num_examples": 10, "rollouts_per_example": 2}
    ]
    wandb = config["monitor"]["wandb"]
    assert (wandb["enabled"], wandb["project"], wandb["entity"], wandb["name"]) == (
        True, "my-rl-project", "my-team", "experiment-1")  # fmt: skip
    # No seq_len in the short form: derived from the model (max_position_embeddings 512).
    assert (config["inference"]["max_model_len"], orchestrator["seq_len"]) == (512, 512)
    # Each service's own file holds the same values.
    assert resolved(tmp_path, "orchestrator")["batch_size"] == 16
    assert resolved(tmp_path, "monitor")["wandb"]["entity"] == "my-team"


def test_short_and_full_keys_mix(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    extra = "[orchestrator]\nmax_async_level = 0\nseq_len = 1024\n[trainer.optimizer]\nlr = 3e-4\n"
    path = example(tmp_path, tiny_model_dir, extra)
    # The same value given both ways is fine: 8 examples x 2 = 16 rollouts.
    code, err = rl(capsys, "@", str(path), "--orchestrator.batch-size", "16", "--orchestrator.sampling.max-tokens",
                   "128")  # fmt: skip
    assert (code, err) == (0, [])
    assert resolved(tmp_path)["orchestrator"]["batch_size"] == 16
    assert rl(capsys, "@", str(path), "--batch-size", "4") == (0, [])
    config = resolved(tmp_path)
    # A flag over the file's short key: 4 examples x 2 rollouts.
    assert config["orchestrator"]["batch_size"] == 8
    assert (config["orchestrator"]["max_async_level"], config["trainer"]["optimizer"]["lr"]) == (0, 3e-4)
    assert config["orchestrator"]["seq_len"] == 1024  # given, so not derived


@pytest.mark.parametrize(("flags", "short", "full"), [
    (["--orchestrator.batch-size", "32"], "batch_size = 8 (x orchestrator.rollouts_per_example 2 = 16)",
     "orchestrator.batch_size = '32'"),
    (["--orchestrator.sampling.temperature", "0.5"], "sampling.temperature = 0.8",
     "orchestrator.sampling.temperature = '0.5'"),
    (["--orchestrator.rollouts-per-example", "4"], "rollouts_per_example = 2",
     "orchestrator.rollouts_per_example = '4'"),
    (["--orchestrator.group-size", "4"], "orchestrator.group_size = '4'", "rollouts_per_example = 2"),
    (["--monitor.wandb.project", "other"], "wandb.project = 'my-rl-project'", "monitor.wandb.project = 'other'"),
])  # fmt: skip
def test_a_key_given_both_ways_with_different_values_names_both(flags, short, full, tiny_model_dir, tmp_path,  # noqa: F811
                                                               capsys):  # fmt: skip
    code, err = rl(capsys, "@", str(example(tmp_path, tiny_model_dir)), *flags)
    assert code == 2 and len(err) == 1, err
    assert short in err[0] and full in err[0], err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("value", "words"), [("-0.5", "greater than or equal to 0"), ("0", "above 0")])
def test_temperature_must_be_above_zero(value, words, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    code, err = rl(capsys, "@", str(example(tmp_path, tiny_model_dir)), "--sampling.temperature", value)
    assert code == 2 and len(err) == 1 and "sampling.temperature" in err[0] and words in err[0], err


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "many"])
def test_batch_size_is_a_count_of_examples(value, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    code, err = rl(capsys, "@", str(example(tmp_path, tiny_model_dir)), "--batch-size", value)
    assert code == 2 and err == [f"rlbus rl: batch_size = {value!r}: must be a whole number of at least 1"]


def test_unknown_keys_stay_errors(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    code, err = rl(capsys, "@", str(example(tmp_path, tiny_model_dir)), "--batch-sise", "8")
    assert (code, err) == (2, ["rlbus rl: unknown key 'batch_sise' (did you mean 'batch_size'?)"])
    path = example(tmp_path, tiny_model_dir, "[sampling.nested]\nx = 1\n")
    code, err = rl(capsys, "@", str(path))
    assert code == 2 and len(err) == 1 and "orchestrator.sampling.nested" in err[0], err


def test_wandb_and_checkpoint_flags(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "minimal.toml"
    path.write_text(f'model = "{tiny_model_dir}"\noutput_dir = "{tmp_path / "run"}"\nbatch_size = 4\n')
    flags = ["--wandb", "--wandb.project", "p", "--wandb.entity", "e", "--wandb.name", "n",
             "--orchestrator.group-size", "2", "--ckpt", "--ckpt.keep-interval", "10", "--ckpt.weights-only",
             "--ckpt.save-async"]  # fmt: skip
    assert rl(capsys, "@", str(path), *flags) == (0, [])
    config = resolved(tmp_path)
    assert config["monitor"]["wandb"] | {"samples_interval": 0} == {
        "enabled": True, "project": "p", "entity": "e", "name": "n", "samples_interval": 0}  # fmt: skip
    assert (config["orchestrator"]["batch_size"], config["orchestrator"]["rollouts_per_example"]) == (8, 2)
    assert (config["trainer"]["ckpt"]["enabled"], config["trainer"]["ckpt"]["keep_interval"]) == (True, 10)
    assert config["ckpt"]["keep_interval"] == 10
    assert (config["trainer"]["ckpt"]["weights_only"], config["trainer"]["ckpt"]["save_async"]) == (True, True)
    # A [wandb] table enables W&B; --no-wandb turns it off again.
    assert rl(capsys, "@", str(example(tmp_path, tiny_model_dir)), "--no-wandb") == (0, [])
    assert resolved(tmp_path)["monitor"]["wandb"]["enabled"] is False


def test_wandb_api_key_is_a_secret_from_the_flag_or_the_environment(tiny_model_dir, tmp_path, capsys,  # noqa: F811
                                                                    monkeypatch):  # fmt: skip
    path = example(tmp_path, tiny_model_dir)
    assert rl(capsys, "@", str(path), "--wandb-api-key", "key-from-flag") == (0, [])
    for stem in ("rl", "monitor"):
        text = (tmp_path / "run" / "configs" / f"{stem}.toml").read_text()
        assert "key-from-flag" not in text and REDACTED in text
    monkeypatch.setenv("WANDB_API_KEY", "key-from-env")
    config = load_config(RlConfig, ["@", str(path)], env=service_env(None, os.environ))
    assert config.monitor.wandb.api_key == "key-from-env"
    # The flag sits above the environment; a monitor started alone reads the variable too.
    flagged = load_config(RlConfig, ["@", str(path), "--wandb-api-key", "k2"], env=service_env(None, os.environ))
    assert flagged.monitor.wandb.api_key == "k2"
    assert service_env("monitor", os.environ)["wandb"]["api_key"] == "key-from-env"


def test_a_full_config_keeps_its_lengths(tiny_model_dir):  # noqa: F811
    # Only a short config derives its lengths: a full one keeps the defaults (and the pre-start check).
    config = load_config(RlConfig, ["--model", str(tiny_model_dir), "--orchestrator.batch-size", "32"], env={})
    assert (config.inference.max_model_len, config.orchestrator.seq_len) == (2048, 2048)


def test_rlbus_init_prints_a_commented_config_that_loads(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    capsys.readouterr()
    assert main(["init", "--model", str(tiny_model_dir), "--env", "reverse-text"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#") and f'model = "{tiny_model_dir}"' in text
    path = tmp_path / "rl.toml"
    path.write_text(text)
    assert rl(capsys, "@", str(path), "--output-dir", str(tmp_path / "run")) == (0, [])
    config = resolved(tmp_path)
    assert (config["orchestrator"]["batch_size"], config["inference"]["max_model_len"]) == (64, 512)
    assert config["orchestrator"]["train"]["env"][0]["id"] == "reverse-text"


def test_every_short_key_is_in_the_docs():
    text = (ROOT / "docs" / "config.md").read_text()
    for row in SHORT_KEYS:
        assert f"| `{row.short}` | `{row.full}` |" in text, row.short
