"""``[[orchestrator.train.env]]`` / ``[[orchestrator.eval.env]]``: an environment served by a verifiers env
server (``server_address``) reaches its loader, and bad addresses are config errors naming them."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from rlbus.services.orchestrator.config import EnvSpec, EvalEnvSpec, OrchestratorConfig

ADDRESS = "tcp://env-server:5000"


def test_the_server_address_travels_to_the_loader_with_the_args() -> None:
    spec = EnvSpec(id="verifiers:textarena", args={"taskset.game": "Hangman-v0"}, server_address=ADDRESS)
    assert spec.loader_args == {"taskset.game": "Hangman-v0", "server_address": ADDRESS}
    assert spec.args == {"taskset.game": "Hangman-v0"}  # the spec itself is unchanged
    assert EnvSpec(id="reverse-text", args={"seed": 1}).loader_args == {"seed": 1}
    for address in ("tcp://127.0.0.1:5000", "tcp://[::1]:5000", "ipc:///tmp/textarena.sock"):
        assert EvalEnvSpec(id="verifiers:textarena", server_address=address).loader_args["server_address"] == address


@pytest.mark.parametrize(
    "address", ["env-server:5000", "http://env-server:5000", "tcp://env-server", "tcp://env-server:0",
                "tcp://env-server:70000", "tcp://*:5000", "tcp://:5000", "ipc://", "inproc://textarena"],
)  # fmt: skip
def test_an_address_a_client_cannot_connect_to_is_refused_naming_it(address: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(f"server_address {address!r} is not a ZeroMQ address")):
        EnvSpec(id="verifiers:textarena", server_address=address)


def test_only_verifiers_environments_run_on_an_env_server() -> None:
    with pytest.raises(ValidationError, match="'reverse-text': server_address 'tcp://env-server:5000' needs"):
        EnvSpec(id="reverse-text", server_address=ADDRESS)
    with pytest.raises(ValidationError, match="as `server_address` next to `args`"):
        EvalEnvSpec(id="verifiers:textarena", args={"server_address": ADDRESS})


def test_the_orchestrator_config_reads_server_addresses_from_toml_tables() -> None:
    config = OrchestratorConfig.model_validate({
        "train": {"env": [{"id": "verifiers:textarena", "server_address": ADDRESS, "args": {"num_examples": 8}}]},
        "eval": {"interval": 1, "env": [{"id": "verifiers:textarena", "server_address": ADDRESS}]},
    })  # fmt: skip
    assert config.train.env[0].loader_args == {"num_examples": 8, "server_address": ADDRESS}
    assert config.eval.env[0].server_address == ADDRESS
    with pytest.raises(ValidationError, match="server_adress"):  # a typo is an unknown key, not ignored
        OrchestratorConfig.model_validate({"train": {"env": [{"id": "verifiers:x", "server_adress": ADDRESS}]}})
