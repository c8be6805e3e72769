"""Find environments by name through the ``rlbus.environments`` entry point group.

Any installed package can add environments by declaring, in its
``pyproject.toml``::

    [project.entry-points."rlbus.environments"]
    my-env = "my_package.my_env:load_environment"

where ``load_environment(**args)`` returns an :class:`Environment`. The
orchestrator and the env-workers call :func:`load_environment` with the
``id`` and ``args`` of ``[[orchestrator.train.env]]`` and must get the same
examples. Ids of the form ``verifiers:<name>`` load an environment written for
the ``verifiers`` library instead (the ``verifiers`` extra).

Importing this module imports no torch, vLLM or HTTP client.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from services.env_worker.environment import Environment

ENTRY_POINT_GROUP = "rlbus.environments"
VERIFIERS_PREFIX = "verifiers:"


def available_environments() -> dict[str, EntryPoint]:
    """Installed environments by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_environment(env_id: str, args: Mapping[str, Any] | None = None) -> Environment:
    """The environment registered as ``env_id``, built with keyword arguments ``args``.

    Raises ValueError for an unknown id or arguments the loader does not take,
    TypeError for a loader that does not return an :class:`Environment`.
    """
    args = dict(args or {})
    if env_id.startswith(VERIFIERS_PREFIX):
        from services.env_worker.verifiers_adapter import load_verifiers_environment

        return load_verifiers_environment(env_id.removeprefix(VERIFIERS_PREFIX), args)
    installed = available_environments()
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


def _check_args(env_id: str, loader: Any, args: dict[str, Any]) -> None:
    """Name unknown arguments before calling, so a typo in the config reads as one."""
    params = inspect.signature(loader).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ValueError(f"environment {env_id!r} does not take argument(s) {unknown}; it takes {sorted(accepted)}")
