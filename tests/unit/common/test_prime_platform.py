"""Where the Prime API key, team and dashboard come from, and what a run registers with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlbus.config import load_config
from rlbus.config.base import REDACTED
from rlbus.prime_platform import (
    PlatformError,
    api_root,
    dashboard_url,
    registration_payload,
    resolve_api_key,
    resolve_team_id,
    run_name,
)  # fmt: skip
from rlbus.services.run_config import RlConfig


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def write_prime_config(home: Path, values: object) -> Path:
    path = home / ".prime" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


def test_the_key_comes_from_the_environment_first_then_the_prime_config_file(home):
    write_prime_config(home, {"api_key": "from-file"})
    assert resolve_api_key({"PRIME_API_KEY": "from-env"}) == "from-env"
    assert resolve_api_key({"PRIME_API_KEY": "  "}) == "from-file"
    assert resolve_api_key({"PRIME_API_KEY": ""}) == "from-file"  # compose's ${PRIME_API_KEY-} when not given
    assert resolve_api_key({}) == "from-file"


def test_no_key_anywhere_names_both_places_and_the_scope(home):
    write_prime_config(home, {"team_id": "t"})  # a file without a key
    with pytest.raises(PlatformError) as error:
        resolve_api_key({})
    message = str(error.value)
    assert "PRIME_API_KEY is not set" in message and f"{home}/.prime/config.json has no api_key" in message
    assert "prime login" in message and "rft:write" in message
    with pytest.raises(PlatformError, match="PRIME_API_KEY is empty and .* has no api_key"):
        resolve_api_key({"PRIME_API_KEY": ""})


def test_a_broken_prime_config_file_is_named(home):
    path = home / ".prime" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(PlatformError, match=f"{path} cannot be read as JSON"):
        resolve_api_key({})
    write_prime_config(home, ["a", "list"])
    with pytest.raises(PlatformError, match="holds a JSON list, not an object"):
        resolve_api_key({})


def test_the_team_is_the_config_then_the_environment_then_the_file(home):
    write_prime_config(home, {"team_id": "file-team"})
    assert resolve_team_id("config-team", {"PRIME_TEAM_ID": "env-team"}) == "config-team"
    assert resolve_team_id(None, {"PRIME_TEAM_ID": "env-team"}) == "env-team"
    assert resolve_team_id(None, {}) == "file-team"
    write_prime_config(home, {})
    assert resolve_team_id(None, {}) is None


def test_dashboard_url_follows_the_frontend_setting(home):
    assert dashboard_url("r1", {}) == "https://app.primeintellect.ai/dashboard/training/r1"
    write_prime_config(home, {"frontend_url": "https://staging.example/"})
    assert dashboard_url("r1", {}) == "https://staging.example/dashboard/training/r1"
    assert dashboard_url("r1", {"PRIME_FRONTEND_URL": "http://localhost:3000"}) == (
        "http://localhost:3000/dashboard/training/r1"
    )


@pytest.mark.parametrize(
    "base_url",
    ["https://api.primeintellect.ai", "https://api.primeintellect.ai/", "https://api.primeintellect.ai/api/v1",
     "https://api.primeintellect.ai/api/v1/rft"],
)  # fmt: skip
def test_the_api_root_is_the_same_for_an_origin_and_prime_rls_longer_url(base_url):
    assert api_root(base_url) == "https://api.primeintellect.ai/api/v1/rft"


def rl_values(*args: str) -> dict:
    config = load_config(RlConfig, ["--inference.api-key", "inference-secret", *args], env={})
    return config.model_dump(mode="json")


def test_registration_carries_the_runs_shape_and_no_secret():
    values = rl_values("--model", "models/tiny", "--max-steps", "3", "--orchestrator.batch-size", "8",
                       "--orchestrator.rollouts-per-example", "4", "--orchestrator.seq-len", "512",
                       "--orchestrator.train.env", '[{"id": "reverse-text"}, {"id": "arithmetic"}]')  # fmt: skip
    payload = registration_payload(values, "my-run", "team-1")
    assert {k: v for k, v in payload.items() if k != "run_config"} == {
        "base_model": "models/tiny", "max_steps": 3, "name": "my-run", "team_id": "team-1", "batch_size": 8,
        "rollouts_per_example": 4, "seq_len": 512, "environments": [{"id": "reverse-text"}, {"id": "arithmetic"}],
    }  # fmt: skip
    assert payload["run_config"]["inference"]["api_key"] == REDACTED
    assert "inference-secret" not in json.dumps(payload)


def test_registration_names_wandb_only_when_it_logs_and_leaves_out_what_is_unset():
    values = rl_values("--wandb.project", "proj", "--wandb.name", "wb-run")
    payload = registration_payload(values, run_name(None, values), None)
    assert payload["name"] == "wb-run"  # the W&B run name, as the platform's docs say
    assert (payload["wandb_project"], payload["wandb_run_name"]) == ("proj", "wb-run")
    assert "team_id" not in payload and "wandb_entity" not in payload
    assert payload["max_steps"] == 0  # no max_steps: until stopped
    assert run_name("explicit", values) == "explicit"
    quiet = registration_payload(rl_values(), None, None)
    assert not any(key.startswith("wandb") for key in quiet) and "name" not in quiet
