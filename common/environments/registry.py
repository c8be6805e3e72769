"""Find environments by name through the ``rlbus.environments`` entry point group.

Any installed package can add environments by declaring, in its
``pyproject.toml``::

    [project.entry-points."rlbus.environments"]
    my-env = "my_package.my_env:load_environment"

where ``load_environment(**args)`` returns an :class:`Environment`. The
orchestrator and the env-workers call :func:`load_environment` with the
``id`` and ``args`` of ``[[orchestrator.train.env]]`` and must get the same
examples. An id with a prefix, ``<prefix>:<name>``, goes to the loader that a
package registered for that prefix in the ``rlbus.environment_loaders`` group;
the env-worker registers ``verifiers`` (environments written for the
``verifiers`` library, its ``verifiers`` extra)::

    [project.entry-points."rlbus.environment_loaders"]
    verifiers = "rlbus.services.env_worker.verifiers_adapter:load_verifiers_environment"

An environment module may define ``validate_args(**args)`` next to its loader: it raises
ValueError for arguments the loader would refuse, without building anything, so that
``rlbus rl --dry-run`` refuses them before a service starts (:func:`check_environment`).

An env spec's ``server_address`` (an environment served by another process, e.g. a verifiers
env server) reaches its prefix loader as the argument ``server_address``
(:data:`SERVER_ADDRESS_ARG`); a loader that cannot reach the server raises
:class:`EnvironmentUnavailable`, which :class:`~rlbus.environments.EnvironmentCache` does not keep.

Importing this module imports no torch, vLLM or HTTP client.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from rlbus.environments.base import Environment
from rlbus.errors import UserError

ENTRY_POINT_GROUP = "rlbus.environments"
LOADER_GROUP = "rlbus.environment_loaders"
SERVER_ADDRESS_ARG = "server_address"
"""The loader argument carrying an env spec's ``server_address``."""


class UnknownEnvironmentError(ValueError):
    """An environment id that no installed entry point (nor prefix loader) provides."""


class EnvironmentUnavailable(UserError):
    """The server an environment runs on does not answer; loading it again may succeed later."""


def checked_server_address(address: str) -> str:
    """``address`` when it is a ZeroMQ address a client can connect to: ``tcp://host:port`` or
    ``ipc://path``; ValueError naming it otherwise."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme == "ipc" and rest:
        return address
    host, colon, port = rest.rpartition(":")
    is_port = port.isdigit() and 0 < int(port) < 65536
    if sep and scheme == "tcp" and colon and host.strip("[]") not in ("", "*") and is_port:
        return address
    raise ValueError(f"server_address {address!r} is not a ZeroMQ address to connect to: write "
                     "tcp://host:port (port 1-65535) or ipc:///path/to/socket")  # fmt: skip


def available_environments() -> dict[str, EntryPoint]:
    """Installed environments by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_loaders() -> dict[str, EntryPoint]:
    """Installed loaders of prefixed ids (``<prefix>:<name>``) by prefix."""
    return {ep.name: ep for ep in entry_points(group=LOADER_GROUP)}


def load_environment(env_id: str, args: Mapping[str, Any] | None = None) -> Environment:
    """The environment registered as ``env_id``, built with keyword arguments ``args``.

    Raises ValueError for an unknown id or arguments the loader does not take,
    TypeError for a loader that does not return an :class:`Environment`.
    """
    args = dict(args or {})
    installed = available_environments()
    prefix, colon, name = env_id.partition(":")
    if colon and env_id not in installed:
        return _load_prefixed(env_id, prefix, name, args)
    if env_id not in installed:
        raise ValueError(
            f"unknown environment {env_id!r}; installed ({ENTRY_POINT_GROUP} entry points): {sorted(installed)}"
        )
    loader = installed[env_id].load()
    _check_args(env_id, loader, args)
    env = loader(**args)
    if not isinstance(env, Environment):
        raise TypeError(f"environment {env_id!r}: {installed[env_id].value} returned {type(env).__name__}, "
                         "not an rlbus Environment")  # fmt: skip
    return env


def _load_prefixed(env_id: str, prefix: str, name: str, args: dict[str, Any]) -> Environment:
    loaders = available_loaders()
    if prefix not in loaders:
        raise ValueError(f"unknown environment {env_id!r}: no loader for the prefix {prefix + ':'!r}; "
                         f"installed ({LOADER_GROUP} entry points): {sorted(loaders)}")
    env = loaders[prefix].load()(name, args)
    if not isinstance(env, Environment):
        raise TypeError(f"environment {env_id!r}: {loaders[prefix].value} returned {type(env).__name__}, "
                        "not an rlbus Environment")
    return env


def check_environment(env_id: str, args: Mapping[str, Any] | None = None) -> None:
    """Refuse what :func:`load_environment` would refuse, without building the environment.

    Imports the environment's module (never its data) and binds ``args`` to its loader, then
    calls the module's optional ``validate_args`` with every argument, defaults included.
    A prefixed id is only checked for an installed loader: its loader takes any arguments.
    Raises :class:`UnknownEnvironmentError` for an id nothing provides, ValueError for arguments
    (TypeError when a required argument is missing).
    """
    args = dict(args or {})
    installed = available_environments()
    prefix, colon, _ = env_id.partition(":")
    if colon and env_id not in installed:
        if prefix not in available_loaders():
            raise UnknownEnvironmentError(f"no loader for the prefix {prefix + ':'!r}; installed "
                                          f"({LOADER_GROUP} entry points): {sorted(available_loaders())}")  # fmt: skip
        return
    if env_id not in installed:
        raise UnknownEnvironmentError(f"unknown environment{_did_you_mean(env_id, installed)}; "
                                      f"installed: {sorted(installed)}")  # fmt: skip
    loader = installed[env_id].load()
    _check_args(env_id, loader, args)
    validate = getattr(sys.modules.get(loader.__module__), "validate_args", None)
    if callable(validate):
        bound = inspect.signature(loader).bind(**args)
        bound.apply_defaults()
        try:
            validate(**bound.arguments)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"environment {env_id!r} refuses these arguments: {exc}") from exc


def _did_you_mean(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_args(env_id: str, loader: Any, args: dict[str, Any]) -> None:
    """Name unknown arguments before calling, so a typo in the config reads as one."""
    params = inspect.signature(loader).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(args) - accepted)
    if unknown:
        hint = "".join(_did_you_mean(name, dict.fromkeys(accepted)) for name in unknown)
        raise ValueError(f"environment {env_id!r} does not take argument(s) {unknown}{hint}; "
                         f"it takes {sorted(accepted)}")  # fmt: skip
