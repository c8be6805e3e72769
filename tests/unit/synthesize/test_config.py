"""``SynthesizeConfig``: the command line and files as users write them, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlbus.config import ConfigError, load_config
from rlbus.config.base import REDACTED, to_toml
from rlbus.services.synthesize.config import SynthesizeConfig


def load(*argv: str) -> SynthesizeConfig:
    return load_config(SynthesizeConfig, list(argv), env={})


def test_flags_and_a_file_make_the_config(tmp_path):
    path = tmp_path / "synth.toml"
    path.write_text('num_examples = 5\n[[env]]\nid = "guess-number"\nargs = {max_turns = 3}\n'
                    '[[env]]\nid = "reverse-text"\n')  # fmt: skip
    config = load("@", str(path), "--rollouts-per-example", "4", "--min-reward", "0.5", "--no-progress",
                  "--output", str(tmp_path / "data.jsonl"), "--sampling.max-tokens", "64")  # fmt: skip
    assert [(e.id, e.args) for e in config.env] == [("guess-number", {"max_turns": 3}), ("reverse-text", {})]
    assert (config.num_examples, config.rollouts_per_example, config.min_reward) == (5, 4, 0.5)
    assert config.progress is False and config.sampling.max_tokens == 64
    assert config.output_path == tmp_path / "data.jsonl"
    assert config.rejects_path == tmp_path / "data.rejected.jsonl"


def test_the_output_defaults_to_the_output_dir():
    config = load("--env", '[{"id": "reverse-text"}]', "--output-dir", "runs/a")
    assert config.output_path == Path("runs/a/synthetic.jsonl")
    assert config.rejects_path == Path("runs/a/synthetic.rejected.jsonl")


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        ((), r"no environment to roll out: add at least one \[\[env\]\]"),
        (("--env", '[{"id": "reverse-txt"}]'), r"env\[0\]\.id = 'reverse-txt': unknown .*did you mean 'reverse-text'"),
        (("--env", '[{"id": "reverse-text", "args": {"nmu_examples": 3}}]'),
         r"env\[0\]\.args = .*does not take argument\(s\) \['nmu_examples'\]"),
        (("--env", '[{"id": "reverse-text"}]', "--num-examples", "0"), r"num_examples: Input should be greater than"),
        (("--env", '[{"id": "reverse-text"}]', "--rollouts-per-example", "0"), r"rollouts_per_example"),
        (("--env", '[{"id": "reverse-text"}]', "--max-concurrent", "0"), r"max_concurrent"),
        (("--env", '[{"id": "reverse-text"}]', "--output", "data.csv"), r"'data.csv' does not end in .jsonl"),
        (("--env", '[{"id": "reverse-text"}]', "--clinet.base-url", "x"), r"clinet"),
    ],
)  # fmt: skip
def test_mistakes_are_refused_before_anything_starts(argv, error):
    with pytest.raises(ConfigError, match=error):
        load(*argv)


def test_the_key_comes_from_the_flag_or_the_named_variable_and_is_never_written(monkeypatch):
    monkeypatch.setenv("MY_ENDPOINT_KEY", "from-env")
    by_var = load("--env", '[{"id": "reverse-text"}]', "--client.api-key-var", "MY_ENDPOINT_KEY")
    assert by_var.client.resolved_api_key() == "from-env"
    by_flag = load("--env", '[{"id": "reverse-text"}]', "--client.api-key", "from-flag",
                   "--client.api-key-var", "MY_ENDPOINT_KEY")  # fmt: skip
    assert by_flag.client.resolved_api_key() == "from-flag"
    assert "from-flag" not in to_toml(by_flag) and REDACTED in to_toml(by_flag)
    monkeypatch.delenv("MY_ENDPOINT_KEY")
    assert by_var.client.resolved_api_key() is None
    assert load("--env", '[{"id": "reverse-text"}]').client.resolved_api_key() is None
