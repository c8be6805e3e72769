"""The inference HTTP bind rule: a non-loopback host needs an API key or an explicit opt-out."""

from __future__ import annotations

import pytest

from rlbus.config import ConfigError, load_config
from rlbus.services.inference.config import InferenceConfig


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", ""])
def test_a_non_loopback_http_host_without_an_api_key_is_refused(host):
    with pytest.raises(ConfigError) as error:
        load_config(InferenceConfig, ["--host", host], env={})
    message = str(error.value)
    assert "refusing to serve the inference HTTP API" in message
    assert "inference.api_key" in message and "inference.allow_insecure_remote" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_hosts_need_no_api_key(host):
    assert InferenceConfig(host=host).api_key is None


def test_an_api_key_or_the_opt_out_allows_a_remote_host():
    assert InferenceConfig(host="0.0.0.0", api_key="k").host == "0.0.0.0"
    assert InferenceConfig(host="0.0.0.0", allow_insecure_remote=True).api_key is None
    env = {"api_key": "from-env"}  # RLBUS_INFERENCE__API_KEY
    assert load_config(InferenceConfig, ["--host", "0.0.0.0"], env=env).api_key == "from-env"
