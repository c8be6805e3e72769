"""Config machinery shared by every service (pydantic-settings, TOML, CLI, env)."""

from rlbus.config.base import BusConfig, BusEndpoints, ConfigModel, LogConfig, ServiceConfig, to_toml, write_toml
from rlbus.config.errors import ConfigError
from rlbus.config.loader import deep_merge, env_values, load_config, parse_argv, read_toml

__all__ = [
    "BusConfig", "BusEndpoints", "ConfigError", "ConfigModel", "LogConfig", "ServiceConfig",
    "deep_merge", "env_values", "load_config", "parse_argv", "read_toml", "to_toml", "write_toml",
]  # fmt: skip
