"""Environments: the API an environment author writes against, the registry, and the built-ins.

The one import path for authors::

    from rlbus.environments import Environment, Rubric, RolloutState, ToolEnvironment, load_jsonl

Every service may import this package (it lives in ``common/``, which is the
``rlbus`` package): the env-worker runs rollouts with it, the orchestrator
counts examples with :func:`load_environment`, the trainer builds SFT data from
a built-in environment. It imports no torch, vLLM or HTTP client. The old path
``services.env_worker.environment`` (and ``.tools``, ``.registry``, ``.envs``)
still works for one release, with a ``DeprecationWarning``
(:mod:`rlbus.environments.legacy`).
"""

from rlbus.environments.base import Environment, Message, RewardFunc, RolloutState, Rubric, checked_reward, load_jsonl
from rlbus.environments.cache import EnvironmentCache
from rlbus.environments.legacy import install_legacy_aliases
from rlbus.environments.registry import (
    SERVER_ADDRESS_ARG,
    EnvironmentUnavailable,
    UnknownEnvironmentError,
    available_environments,
    available_loaders,
    check_environment,
    checked_server_address,
    load_environment,
)
from rlbus.environments.tools import ToolEnvironment, parse_hermes_tool_calls, tool_schema

__all__ = [
    "SERVER_ADDRESS_ARG",
    "Environment", "EnvironmentCache", "EnvironmentUnavailable", "Message", "RewardFunc", "RolloutState", "Rubric",
    "ToolEnvironment", "UnknownEnvironmentError",
    "available_environments", "available_loaders", "check_environment", "checked_reward", "checked_server_address",
    "load_environment",
    "load_jsonl",
    "parse_hermes_tool_calls", "tool_schema",
]  # fmt: skip

install_legacy_aliases()
