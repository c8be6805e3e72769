"""The config loader: sources, precedence, flags and error messages."""

from pathlib import Path

import pytest

from rlbus.config import ConfigError, ConfigModel, ServiceConfig, env_values, load_config, to_toml
from rlbus.config.loader import parse_argv


class Inner(ConfigModel):
    depth: int = 1
    """How deep."""
    enabled: bool = False
    """Whether it is on."""


class Example(ServiceConfig):
    batch_size: int = 8
    """Rollouts per step."""
    temperature: float = 1.0
    """Sampling temperature."""
    names: list[str] = ["a"]
    """Some names."""
    inner: Inner = Inner()
    """A nested table."""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_cli_over_files_over_env_over_defaults(tmp_path):
    first = write(tmp_path / "a.toml", "batch_size = 16\ntemperature = 0.5\n[inner]\ndepth = 2\n")
    second = write(tmp_path / "b.toml", "[inner]\nenabled = true\n")
    env = env_values(Example, {"RLBUS_TEMPERATURE": "0.25", "RLBUS_SEED": "7", "OTHER": "x"})
    config = load_config(Example, ["@", str(first), f"@{second}", "--batch-size", "32"], env=env)
    assert config.batch_size == 32  # CLI beats file
    assert config.temperature == 0.5  # file beats env
    assert config.seed == 7  # env beats default
    assert config.inner == Inner(depth=2, enabled=True)  # tables merged key by key
    assert config.names == ["a"]


def test_flags_no_flags_equals_and_json_values():
    config = load_config(Example, ["--inner.enabled", "--inner.depth=5", "--names", '["x", "y"]'], env={})
    assert config.inner.enabled and config.inner.depth == 5 and config.names == ["x", "y"]
    for argv in (["--inner.no-enabled"], ["--no-inner.enabled"], ["--inner.enabled=false"]):
        assert load_config(Example, ["--inner.enabled", *argv], env={}).inner.enabled is False


def test_nested_env_variables_use_double_underscore():
    env = env_values(Example, {"RLBUS_INNER__DEPTH": "9", "rlbus_batch_size": "4"})
    assert env == {"inner": {"depth": "9"}, "batch_size": "4"}
    assert load_config(Example, [], env=env).inner.depth == 9


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--batch-sise", "3"], "unknown key 'batch_sise' (did you mean 'batch_size'?)"),
        (["--inner.dept", "3"], "unknown key 'inner.dept' (did you mean 'depth'?)"),
        (["--batch-size", "many"], "batch_size: Input should be a valid integer"),
        (["--batch-size"], "--batch-size needs a value"),
        (["--names", "[oops"], "is not valid JSON"),
        (["stray"], "unexpected argument 'stray'"),
        (["--no-batch-size"], "unknown key 'no_batch_size'"),
        (["@"], "'@' must be followed by a config file path"),
    ],
)
def test_cli_mistakes_name_the_key(argv, expected):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(Example, argv, env={})
    assert expected in str(error.value)


def test_file_mistakes_name_the_key_value_and_file(tmp_path):
    bad_key = write(tmp_path / "k.toml", "[inner]\ndeepth = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'inner.deepth' \(did you mean 'depth'\?\)"):
        load_config(Example, ["@", str(bad_key)], env={})
    bad_value = write(tmp_path / "v.toml", "temperature = 'hot'\n")
    with pytest.raises(ConfigError, match=r"temperature: .*valid number.*'hot'"):
        load_config(Example, ["@", str(bad_value)], env={})
    broken = write(tmp_path / "b.toml", "batch_size = = 3\n")
    with pytest.raises(ConfigError, match=r"b.toml is not valid TOML"):
        load_config(Example, ["@", str(broken)], env={})
    with pytest.raises(ConfigError, match=r"missing.toml does not exist"):
        load_config(Example, ["@", str(tmp_path / "missing.toml")], env={})


def test_unknown_environment_variable_is_an_error():
    with pytest.raises(ConfigError, match=r"RLBUS_BATCH_SIZ: unknown key 'batch_siz' \(did you mean 'batch_size'\?\)"):
        env_values(Example, {"RLBUS_BATCH_SIZ": "3"})


def test_the_scripts_own_variables_are_not_config_keys():
    # scripts/setup_env.sh reads RLBUS_VENV and RLBUS_EXTRAS; quickstart.sh then runs rlbus with them set.
    tools = {"RLBUS_VENV": "/opt/venv", "RLBUS_EXTRAS": "trainer", "RLBUS_FUZZ_EXAMPLES": "10",
             "RLBUS_FAULT_POINTS": "trainer.before_batch_ack", "RLBUS_AUDIT_DIR": "/tmp/audit",
             "RLBUS_LAUNCHER_PID": "4242"}  # fmt: skip
    assert env_values(Example, tools | {"RLBUS_BATCH_SIZE": "7"}) == {"batch_size": "7"}


def test_toml_dump_loads_back_equal(tmp_path):
    config = load_config(Example, ["--inner.depth", "4", "--max-steps", "3", "--names", '["q"]'], env={})
    path = write(tmp_path / "dump.toml", to_toml(config))
    assert load_config(Example, ["@", str(path)], env={}) == config


def test_parse_argv_collects_files_in_order(tmp_path):
    files, overrides = parse_argv(Example, ["@", "a.toml", "@b.toml", "--inner.depth", "2"])
    assert files == [Path("a.toml"), Path("b.toml")]
    assert overrides == {"inner": {"depth": "2"}}
