"""The Prime platform's side of a run: where the key and team come from, and what a run registers with.

Both places that register a run use this module: the launcher (``rlbus rl``, also under ``rlbus run``
and ``--slurm``) and a monitor started alone. The HTTP calls are in :mod:`rlbus.platform_client`; the
contract and where each part of it comes from are in docs/platform.md.

The key is never a config value, so no resolved config, log line or W&B run can hold it: it is read
from ``PRIME_API_KEY``, else from ``api_key`` in ``~/.prime/config.json`` (what ``prime login``
writes), where it is needed. The team follows the platform's documented order: the config's
``team_id``, then ``PRIME_TEAM_ID``, then ``team_id`` in the same file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rlbus.config.base import redact_by_name
from rlbus.errors import UserError

KEY_VARIABLE = "PRIME_API_KEY"
TEAM_VARIABLE = "PRIME_TEAM_ID"
FRONTEND_VARIABLE = "PRIME_FRONTEND_URL"
DEFAULT_FRONTEND_URL = "https://app.primeintellect.ai"
"""The dashboard's origin when neither ``PRIME_FRONTEND_URL`` nor the config file names one (prime-runs)."""
API_PATH = "/api/v1/rft"
SCOPE = "rft:write"
"""The scope an API key needs to register and stream external runs."""
_API_SUFFIXES = ("/api/v1/rft", "/api/v1")
LAUNCHER_PID_VARIABLE = "RLBUS_LAUNCHER_PID"
"""Set by ``rlbus rl`` for the services it starts: its own pid. A monitor whose parent is no longer that
pid when it stops knows the launcher died (kill -9) before it could mark the run, and marks it itself."""


class PlatformError(UserError):
    """The platform could not be used: no key, a refused key, an answer that is not the contract."""


def prime_config_path() -> Path:
    """``~/.prime/config.json``, where ``prime login`` keeps the key (read relative to ``HOME``)."""
    return Path.home() / ".prime" / "config.json"


def read_prime_config() -> dict[str, Any]:
    """The Prime CLI's config file as a dict; empty when there is none, a PlatformError when it is not JSON."""
    path = prime_config_path()
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlatformError(f"{path} cannot be read as JSON ({exc}): fix it or run `prime login` again") from None
    if not isinstance(values, dict):
        raise PlatformError(f"{path} holds a JSON {type(values).__name__}, not an object: run `prime login` again")
    return values


def resolve_api_key(environ: Mapping[str, str]) -> str:
    """``PRIME_API_KEY``, else ``api_key`` of ``~/.prime/config.json``; a PlatformError naming both places.
    An empty ``PRIME_API_KEY`` counts as unset: compose passes ``${PRIME_API_KEY-}``, empty when not given."""
    key = environ.get(KEY_VARIABLE, "").strip()
    if key:
        return key
    path = prime_config_path()
    stored = read_prime_config().get("api_key")
    if isinstance(stored, str) and stored.strip():
        return stored.strip()
    unset = "is empty" if KEY_VARIABLE in environ else "is not set"
    raise PlatformError(
        f"prime_platform is set but there is no Prime API key: {KEY_VARIABLE} {unset} and {path} has no "
        f"api_key; export {KEY_VARIABLE}=... or run `prime login` (the key needs the {SCOPE} scope)"
    )


def resolve_team_id(configured: str | None, environ: Mapping[str, str]) -> str | None:
    """``prime_platform.team_id``, then ``PRIME_TEAM_ID``, then ``team_id`` of ``~/.prime/config.json``."""
    if configured:
        return configured
    if environ.get(TEAM_VARIABLE, "").strip():
        return environ[TEAM_VARIABLE].strip()
    stored = read_prime_config().get("team_id")
    return str(stored) if stored else None


def dashboard_url(run_id: str, environ: Mapping[str, str]) -> str:
    """Where the run shows: ``<frontend>/dashboard/training/<run_id>``; the frontend is ``PRIME_FRONTEND_URL``,
    else ``frontend_url`` of ``~/.prime/config.json``, else the platform's own."""
    frontend = environ.get(FRONTEND_VARIABLE) or _file_value("frontend_url") or DEFAULT_FRONTEND_URL
    return f"{frontend.rstrip('/')}/dashboard/training/{run_id}"


def api_root(base_url: str) -> str:
    """``<origin>/api/v1/rft`` for ``base_url``, which may already end in ``/api/v1`` or ``/api/v1/rft``."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/")
    for suffix in _API_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return urlunsplit((parts.scheme, parts.netloc, path, "", "")) + API_PATH


def registration_payload(values: Mapping[str, Any], name: str | None, team_id: str | None) -> dict[str, Any]:
    """The body of ``POST /external-runs`` from a run's merged config as JSON values (``rl.toml``, or
    ``RlConfig.model_dump(mode="json")``): the fields prime-rl's monitor and prime-runs send."""
    orchestrator = _table(values, "orchestrator")
    wandb = _table(_table(values, "monitor"), "wandb")
    envs = _table(orchestrator, "train").get("env") or []
    payload: dict[str, Any] = {
        "base_model": str(values.get("model", "unknown")),
        "max_steps": int(values.get("max_steps") or 0),  # 0: until stopped (prime-rl's convention)
        "environments": [{"id": str(env["id"])} for env in envs if isinstance(env, Mapping) and "id" in env],
        # Secrets are redacted in any dump already; by name too, for a file an older version wrote.
        "run_config": redact_by_name(dict(values)),
    }
    optional = {
        "name": name, "team_id": team_id, "batch_size": orchestrator.get("batch_size"),
        "rollouts_per_example": orchestrator.get("rollouts_per_example"), "seq_len": orchestrator.get("seq_len"),
    }  # fmt: skip
    if wandb.get("enabled"):
        optional.update(wandb_project=wandb.get("project"), wandb_entity=wandb.get("entity"),
                        wandb_run_name=wandb.get("name"))  # fmt: skip
    payload.update({key: value for key, value in optional.items() if value is not None})
    return payload


def run_name(configured: str | None, values: Mapping[str, Any]) -> str | None:
    """``prime_platform.run_name``, else the W&B run name when one is set."""
    return configured or _table(_table(values, "monitor"), "wandb").get("name") or None


def _table(values: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    table = values.get(key)
    return table if isinstance(table, Mapping) else {}


def _file_value(key: str) -> str | None:
    try:
        value = read_prime_config().get(key)
    except PlatformError:
        return None  # only a display URL: a broken file is reported where the key is read
    return value if isinstance(value, str) and value else None
