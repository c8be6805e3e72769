"""Every TOML under configs/ loads with its command, and says what its comments promise."""

import tomllib
from pathlib import Path

import pytest

from rlbus.config import load_config
from rlbus.services.models.cli import COMMANDS as MODEL_COMMANDS
from rlbus.services.models.tiny import TinyModelConfig
from tests.unit.launcher.test_cli import ROOT, rlbus

CONFIGS = ROOT / "configs"
# File name -> the command that reads it; --dry-run validates without starting anything.
COMMANDS = {"rl.toml": ("rl", "--dry-run"), "sft.toml": ("sft", "--dry-run"), "model.toml": ("model", "tiny")}
SHIPPED = sorted(CONFIGS.rglob("*.toml"))
SHORT_EXAMPLES = "examples"
"""configs/examples/: short run configs (any name), read by ``rlbus rl`` and ``rlbus run``."""


def command_of(path: Path) -> tuple[str, str]:
    return ("rl", "--dry-run") if path.parent.name == SHORT_EXAMPLES else COMMANDS[path.name]


def test_every_shipped_config_has_a_known_command():
    unknown = [str(p) for p in SHIPPED if p.parent.name != SHORT_EXAMPLES and p.name not in COMMANDS]
    assert not unknown, unknown
    assert {p.parent.name for p in SHIPPED} >= {"quickstart", "first_letter", "reverse_text", SHORT_EXAMPLES}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_loads_with_its_command(path, tmp_path):
    command, flag = command_of(path)
    if command == "model":  # the command's own parse, without building (a torch import per model)
        config = load_config(MODEL_COMMANDS[flag][0], ["@", str(path)], env={})
        assert isinstance(config, TinyModelConfig) and config.out.name == path.parent.name
        return
    # From an empty folder: whether ./models/<name> exists depends on what ran in the checkout (the
    # quickstart makes models/quickstart, and then models/smollm2 reads as a missing folder, not a hub id).
    result = rlbus(command, "@", str(path), flag, "--output-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    merged = tomllib.loads((tmp_path / "configs" / f"{command}.toml").read_text())
    task = "first-letter" if path.parent.name == "first_letter" else "reverse-text"
    if command == "rl":
        assert [env["id"] for env in merged["orchestrator"]["train"]["env"]] == [task]
    else:
        assert merged["data"]["synthetic"] == task


def test_gpu_example_uses_qwen3_in_bf16_with_prime_rl_reverse_text_settings(tmp_path):
    rl = tomllib.loads((CONFIGS / "reverse_text" / "rl.toml").read_text())
    sft = tomllib.loads((CONFIGS / "reverse_text" / "sft.toml").read_text())
    assert rl["model"] == sft["model"] == "Qwen/Qwen3-0.6B"
    assert rl["max_steps"] == 20 and rl["trainer"]["optimizer"]["lr"] == 3e-6
    orchestrator = rl["orchestrator"]
    assert (orchestrator["batch_size"], orchestrator["rollouts_per_example"]) == (128, 16)
    assert orchestrator["sampling"]["max_tokens"] == 128
    assert rl["inference"]["dtype"] == rl["trainer"]["dtype"] == sft["dtype"] == "bfloat16"


def test_quickstart_is_float32_and_sft_practises_the_rl_task():
    quickstart = CONFIGS / "quickstart"
    rl = tomllib.loads((quickstart / "rl.toml").read_text())
    sft = tomllib.loads((quickstart / "sft.toml").read_text())
    assert rl["inference"]["dtype"] == rl["trainer"]["dtype"] == sft.get("dtype", "float32") == "float32"
    # The warm-up sees the texts RL is rewarded on: the same lengths of text.
    env_args = rl["orchestrator"]["train"]["env"][0].get("args", {})
    for key in ("min_words", "max_words"):
        assert env_args.get(key) == sft["data"].get(key), key
    assert Path(ROOT / rl["model"]).name == Path(tomllib.loads((quickstart / "model.toml").read_text())["out"]).name
