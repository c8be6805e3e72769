"""``[prime_platform]``: the section, its flags, where it lands, and the mistakes refused before anything starts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from rlbus.config import ConfigError, load_config, read_toml, write_toml
from rlbus.services.cli import main as rlbus
from rlbus.services.launcher.main import ALIASES
from rlbus.services.monitor.config import MonitorConfig
from rlbus.services.run_config import RlConfig
from rlbus.services.run_config.short import rewrite_flags
from tests.integration.platform_server import PlatformServer

LOCAL = "http://127.0.0.1:9"


def rl(*argv: str) -> RlConfig:
    return load_config(RlConfig, rewrite_flags(list(argv), ALIASES), env={})


@pytest.mark.parametrize(
    "argv",
    [["--prime_platform.base_url", LOCAL], ["--prime-platform.base-url", LOCAL],
     ["--orchestrator.prime-monitor", "--prime-platform.base-url", LOCAL],
     ["--prime-platform.base-url", LOCAL, "--orchestrator.prime-monitor"],
     ["--orchestrator.prime_monitor", "--prime_platform.base_url", LOCAL]],
)  # fmt: skip
def test_every_flag_form_enables_it_and_it_lands_in_the_monitors_section(argv):
    config = rl(*argv)
    assert config.prime_platform is not None and config.prime_platform.base_url == LOCAL
    assert config.monitor.prime_platform == config.prime_platform


def test_the_bare_flag_and_an_empty_section_take_the_defaults(tmp_path):
    assert rl("--orchestrator.prime-monitor").prime_platform.base_url == "https://api.primeintellect.ai"
    path = tmp_path / "rl.toml"
    path.write_text('[prime_platform]\n\n[wandb]\nname = "wb"\n')
    config = rl("@", str(path))
    assert config.prime_platform is not None
    assert (config.prime_platform.run_name, config.prime_platform.team_id) == (None, None)
    assert rl().prime_platform is None and rl().monitor.prime_platform is None


def test_the_section_keys_and_the_monitors_resolved_config(tmp_path):
    path = tmp_path / "rl.toml"
    path.write_text(
        '[prime_platform]\nrun_name = "mine"\nteam_id = "team-1"\nbase_url = "https://x.example/api/v1/rft/"\n'
    )
    config = rl("@", str(path), "--output-dir", str(tmp_path / "run"))
    monitor_toml = tmp_path / "monitor.toml"
    write_toml(config.resolved_configs()["monitor"], monitor_toml)
    section = read_toml(monitor_toml)["prime_platform"]
    assert section == {"run_name": "mine", "team_id": "team-1", "base_url": "https://x.example/api/v1/rft"}
    assert load_config(MonitorConfig, ["@", str(monitor_toml)], env={}).prime_platform == config.prime_platform


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["--prime-platform.base-url", "api.primeintellect.ai"], "is not an http(s) URL of the platform"),
     (["--prime-platform.base-url", "ftp://x"], "is not an http(s) URL"),
     (["--prime-platform.run-id", "../../admin"], "is not a platform run id"),
     (["--prime-platform.colour", "red"], "unknown key"),
     (["--prime-platform.run-name", "a", "--monitor.prime-platform.run-name", "b"], "set [prime_platform] only")],
)  # fmt: skip
def test_bad_values_are_refused_naming_them(argv, needle):
    with pytest.raises(ConfigError) as error:
        rl(*argv)
    assert needle in str(error.value)


def test_table_aliases_go_first_so_keys_given_before_them_stay():
    assert rewrite_flags(["--prime-platform.run-name", "x", "--orchestrator.prime-monitor", "--wandb"], ALIASES) == [
        "--prime_platform={}", "--prime-platform.run-name", "x", "--wandb.enabled",
    ]  # fmt: skip


# ------------------------------------------------------------------ the front door


@pytest.fixture
def front_door(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    for name in [n for n in os.environ if n.startswith(("RLBUS_", "PRIME_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    yield {"model": str(model), "out": str(tmp_path / "out")}
    logger.remove()  # the commands pointed loguru at this test's captured stderr
    logger.add(sys.__stderr__)


def test_no_key_stops_rlbus_rl_before_anything_starts_naming_both_places(front_door, tmp_path, capsys):
    with PlatformServer() as server:
        code = rlbus(["rl", "--model", front_door["model"], "--output-dir", front_door["out"],
                      "--prime-platform.base-url", server.base_url])  # fmt: skip
        assert server.requests == []
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("rlbus rl: prime_platform is set but there is no Prime API key: PRIME_API_KEY is not set")
    assert f"{tmp_path}/.prime/config.json has no api_key" in err[0]
    assert not (Path(front_door["out"]) / "logs" / "monitor.log").exists()  # no service started


def test_a_refused_key_stops_rlbus_rl_naming_the_scope(front_door, monkeypatch, capsys):
    monkeypatch.setenv("PRIME_API_KEY", "sk-not-this-one")
    with PlatformServer(api_key="sk-the-right-one") as server:
        code = rlbus(["rl", "--model", front_door["model"], "--output-dir", front_door["out"],
                      "--prime-platform.base-url", server.base_url])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "refused the API key (HTTP 401)" in err[-1] and "rft:write" in err[-1], err
    assert "sk-not-this-one" not in "\n".join(err)


def test_dry_run_needs_no_key_and_registers_nothing(front_door, capsys):
    with PlatformServer() as server:
        code = rlbus(["rl", "--model", front_door["model"], "--output-dir", front_door["out"], "--dry-run",
                      "--prime-platform.base-url", server.base_url])  # fmt: skip
        assert code == 0 and server.requests == []
    monitor = read_toml(Path(front_door["out"]) / "configs" / "monitor.toml")
    assert monitor["prime_platform"] == {"base_url": server.base_url}  # no run id: a monitor alone registers


def test_rlbus_run_checks_the_key_before_it_detaches(front_door, monkeypatch, capsys):
    monkeypatch.setenv("RLBUS_HOME", str(Path(front_door["out"]).parent / "home"))
    code = rlbus(["run", "--model", front_door["model"], "--output-dir", front_door["out"],
                  "--orchestrator.prime-monitor"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "there is no Prime API key" in err, err
    assert not (Path(front_door["out"]) / "logs").exists()
