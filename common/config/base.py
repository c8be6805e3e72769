"""Base classes of every rlbus config, and the fields all services share.

Each service has one config class deriving from :class:`ServiceConfig`; the
merged ``rl`` config (services/run_config/rl.py) holds one section per
service and propagates the shared fields into them. Field docstrings are the
documentation: ``docs/config.md`` and ``--help`` are generated from them.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import tomli_w
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, SerializationInfo, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REDACTED = "***redacted***"
"""What a secret field reads as wherever a config is written (resolved files, W&B, ``model_dump``)."""
REVEAL_SECRETS = "reveal_secrets"
"""Serialization context key (``model_dump(context={REVEAL_SECRETS: True})``) for the one writer that
must carry secrets: the SLURM job script, which already carries the Curve keys."""


def _refuse_placeholder(value: str) -> str:
    # A redacted file loaded back must not turn the placeholder into the key itself.
    if value == REDACTED:
        raise ValueError(f"holds the placeholder {REDACTED!r}: resolved config files never hold secrets; "
                         "pass the value in the environment (RLBUS_<SECTION>__<KEY>) or on the command line")  # fmt: skip
    return value


def _redact(value: str, info: SerializationInfo) -> str:
    context = info.context if isinstance(info.context, Mapping) else {}
    return value if context.get(REVEAL_SECRETS) else REDACTED


Secret = Annotated[str, AfterValidator(_refuse_placeholder), PlainSerializer(_redact, return_type=str)]
"""A config field holding a secret: a plain ``str`` in memory, :data:`REDACTED` when serialized."""

STRICT_MODEL = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ConfigModel(BaseModel):
    """A config section: unknown keys are errors, docstrings describe fields."""

    model_config = STRICT_MODEL


class BusEndpoints(ConfigModel):
    """Addresses of the bound sockets. Each is bound by the service named first
    and connected to by the others, so every process needs the same values."""

    orchestrator_tasks: str = "tcp://127.0.0.1:5550"
    """Orchestrator ROUTER handing tasks to env-workers and taking their results."""
    orchestrator_batches: str = "tcp://127.0.0.1:5551"
    """Orchestrator ROUTER serving training batches to trainer ranks."""
    orchestrator_policy: str = "tcp://127.0.0.1:5552"
    """Orchestrator ROUTER where inference replicas report the policy step they serve."""
    trainer_weights: str = "tcp://127.0.0.1:5553"
    """Trainer ROUTER serving weight manifests and buckets to inference replicas."""
    trainer_announce: str = "tcp://127.0.0.1:5554"
    """Trainer XPUB announcing each newly published policy step."""
    monitor_telemetry: str = "tcp://127.0.0.1:5555"
    """Monitor PULL collecting heartbeats, metrics and events from every service."""
    monitor_view: str = "tcp://127.0.0.1:5556"
    """Monitor ROUTER answering live-view requests from ``rlbus tail``."""
    trainer_runs: str = "tcp://127.0.0.1:5559"
    """Shared trainer (``trainer.max_concurrent_runs``) ROUTER where run orchestrators join and
    leave; unused by a single-run trainer."""


class CurveConfig(ConfigModel):
    """CurveZMQ authentication and encryption of every bus socket (docs/security.md)."""

    keys_dir: Path | None = None
    """Folder written by ``rlbus keys`` (or the part of it this host needs): ``server.key``,
    ``server.key_secret`` where a service binds, ``clients/*.key`` (the peers admitted) and this
    host's ``clients/<client_name>.key_secret``. None: plain TCP, allowed on loopback addresses only."""
    client_name: str = "client"
    """Which client key pair this process presents: ``<keys_dir>/clients/<client_name>.key_secret``."""
    allow_insecure_remote: bool = False
    """Let services bind non-loopback addresses without Curve: anyone who reaches a port can then
    send batches, weights and metrics. Only for networks where every host is trusted."""


class BusConfig(ConfigModel):
    """ZeroMQ settings shared by every service."""

    endpoints: BusEndpoints = BusEndpoints()
    """Where each bound socket lives."""
    curve: CurveConfig = CurveConfig()
    """CurveZMQ keys; required whenever a service binds a non-loopback address."""
    bind_host: str | None = None
    """Interface that binding services bind to instead of the endpoint's host
    (e.g. ``0.0.0.0`` for one service per host); None binds the endpoint as written."""
    handshake_timeout_s: float = Field(60.0, gt=0)
    """How long a connecting side waits for its peer's first answer before failing loudly."""
    request_timeout_s: float = Field(30.0, gt=0)
    """How long a request waits for its reply before it is sent again or reported."""
    heartbeat_interval_s: float = Field(2.0, gt=0)
    """Seconds between heartbeats sent to the monitor."""
    send_hwm: int = Field(1000, ge=1)
    """Messages queued per peer before sends block (or, for telemetry, are dropped)."""
    linger_ms: int = Field(1000, ge=0)
    """How long a closing socket keeps trying to deliver queued messages."""
    max_frames: int = Field(4096, ge=3)
    """Frames accepted in one message (envelope, body and one per array); more are rejected."""
    max_frame_bytes: int = Field(2 * 2**30, ge=1024)
    """Bytes accepted in one frame: set as ZMQ_MAXMSGSIZE, so libzmq drops the connection of a peer
    that sends a larger frame before any of it reaches Python."""
    max_header_bytes: int = Field(64 * 2**20, ge=1024)
    """Bytes accepted in a message's envelope and body together (the msgpack part); larger messages
    are rejected before the body is parsed."""
    max_payload_bytes: int = Field(4 * 2**30, ge=1024)
    """Bytes of array buffers accepted in one message (all frames after the body); more are rejected
    before any array is made. Must exceed the largest weight bucket and training batch."""


class LogConfig(ConfigModel):
    """Logging of one service."""

    level: Literal["trace", "debug", "info", "warning", "error"] = "info"
    """Lowest level written to the console and the log file. One line per HTTP request (httpx:
    env-worker to inference) shows only at ``debug``."""
    json_lines: bool = False
    """Write the log file as JSON lines instead of text."""


class _InitOnly(PydanticBaseSettingsSource):
    """Placeholder so pydantic-settings reads nothing behind our back."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {}


class ServiceConfig(BaseSettings):
    """Fields every service has. In the ``rl`` config they are set at the top
    level and propagate into every section."""

    model_config = SettingsConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    SERVICE: ClassVar[str] = ""
    SHARED_FIELDS: ClassVar[tuple[str, ...]] = ("model", "output_dir", "max_steps", "seed", "bus", "log")

    model: str = "models/tiny"
    """Hugging Face model directory (or hub name where a hub is reachable) of the policy."""
    output_dir: Path = Path("outputs")
    """Run folder: configs/, logs/, checkpoints/, weights/, metrics.jsonl."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many training steps; None runs until stopped."""
    seed: int = 0
    """Seed of every random choice (task sampling, initialisation, sampling seeds)."""
    bus: BusConfig = BusConfig()
    """Message bus endpoints and limits."""
    log: LogConfig = LogConfig()
    """Logging settings."""

    @field_validator("output_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # Path("") is the working directory: an unset variable in `--output-dir "$RUN"` would
        # scatter a run's files there (and --clean-output-dir would aim at it).
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: give a run folder, e.g. --output-dir outputs/my-run")
        return value

    def resolved_configs(self) -> dict[str, BaseModel]:
        """What ``--dry-run`` writes: file stem -> config (one per service)."""
        return {self.SERVICE: self}

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any, **_: Any) -> tuple:
        # Files, CLI and environment are merged by rlbus.config.loader with one
        # precedence order and one set of error messages; only init values count.
        return (init_settings, _InitOnly(settings_cls))


def to_toml(config: BaseModel, reveal_secrets: bool = False) -> str:
    """TOML text that loads back into an equal config (None values are omitted); secrets redacted
    unless ``reveal_secrets``: they then load back from the environment (``rlbus.config.loader``)."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True, context={REVEAL_SECRETS: reveal_secrets}))


def write_toml(config: BaseModel, path: Path, reveal_secrets: bool = False) -> Path:
    """Write ``config`` to ``path``, readable by this user only (secrets as in :func:`to_toml`)."""
    return write_private(path, to_toml(config, reveal_secrets))


def write_private(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` in a file made mode 0600 from the start (never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per process: torchrun ranks write the same resolved config at once.
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover tmp file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    tmp.replace(path)
    return path


def secret_paths(cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Dotted paths of every :data:`Secret` field of ``cls`` and of its sub-models."""
    paths = []
    for name, field in cls.model_fields.items():
        for arg in _union_args(field.annotation):
            if arg == Secret:
                paths.append((*prefix, name))
            elif isinstance(arg, type) and issubclass(arg, BaseModel):
                paths += secret_paths(arg, (*prefix, name))
    return paths


def redact_values(values: Mapping[str, Any], paths: list[tuple[str, ...]]) -> dict[str, Any]:
    """A copy of nested ``values`` with the value at each of ``paths`` (where present) redacted."""
    copy = deepcopy(dict(values))
    for path in paths:
        target: Any = copy
        for part in path[:-1]:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict) and target.get(path[-1]) is not None:
            target[path[-1]] = REDACTED
    return copy


SECRET_KEY_SUFFIXES = ("api_key", "token", "secret", "password")
"""Key names :func:`redact_by_name` treats as secrets, where the schema is not at hand."""


def redact_by_name(values: Any) -> Any:
    """A copy of nested ``values`` with every key named like a secret redacted."""
    if isinstance(values, Mapping):
        return {key: REDACTED if str(key).endswith(SECRET_KEY_SUFFIXES) and isinstance(value, str)
                else redact_by_name(value) for key, value in values.items()}  # fmt: skip
    if isinstance(values, list):
        return [redact_by_name(value) for value in values]
    return values


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)
