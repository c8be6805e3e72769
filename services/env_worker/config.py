"""Config of an env-worker (``rlbus env-worker``, section ``[env_worker]``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from rlbus.config import ConfigModel, ServiceConfig
from rlbus.config.base import Secret
from rlbus.teacher import TeacherClientConfig


class InferenceClientSettings(ConfigModel):
    """How rollouts talk to an OpenAI-compatible inference API (the env-worker's, and ``rlbus eval``'s
    ``[client]``): one definition, so both behave the same."""

    api_key: Secret | None = None
    """Key sent to inference as a bearer token (``inference.api_key``); written redacted in resolved
    configs, so a service started from one takes it from the environment (``RLBUS_ENV_WORKER__API_KEY``)."""
    max_concurrent_requests: int = Field(64, ge=1)
    """HTTP requests in flight to inference at once."""
    request_timeout_s: float = Field(300.0, gt=0)
    """Timeout of one inference request."""
    max_retries: int = Field(5, ge=0)
    """Retries of a request after connection errors and 5xx answers, with backoff."""
    retry_backoff_s: float = Field(0.5, gt=0)
    """First wait before retrying a failed inference request; doubles with each retry."""
    max_backoff_s: float = Field(30.0, gt=0)
    """Longest wait between retries, and longest time a failing replica is set aside before its /health is probed."""


class EnvWorkerConfig(ServiceConfig, InferenceClientSettings):
    """Runs rollouts of leased tasks against one or several inference replicas."""

    SERVICE: ClassVar[str] = "env-worker"

    worker_id: str | None = None
    """Name of this worker on the bus; None derives one from host and pid."""
    inference_urls: list[str] = ["http://127.0.0.1:8000/v1"]
    """Base URLs of the inference replicas' OpenAI-compatible APIs."""
    request_model: str | None = None
    """Sent as ``model`` in every inference request: a LoRA run's adapter name (``rlbus rl`` sets it
    from ``trainer.lora.name`` when only the adapter travels). None: no ``model``, the replica's base."""
    max_concurrent_tasks: int = Field(8, ge=1)
    """Tasks this worker runs at once."""
    env_timeout_s: float = Field(600.0, gt=0)
    """Time one rollout may spend in environment code (setup, replies, tools, rewards) before it is
    marked errored; generation time does not count."""
    model_endpoint_host: str | None = None
    """Host name or address at which verifiers env servers (an env spec's ``server_address``) reach
    this worker's model endpoint, which serves their episodes' model calls. None: ``127.0.0.1`` for an
    env server on this host, else this host's address on the route to the server. Set it when the
    server reaches this worker under another name (containers, NAT); the endpoint then listens on
    every interface."""
    env_ids: list[str] = []
    """Environments this worker runs (sent to the orchestrator with each TaskRequest); empty means any installed."""
    result_ack_timeout_s: float = Field(30.0, gt=0)
    """A result not acknowledged by the orchestrator within this many seconds is sent again."""
    teacher: TeacherClientConfig | None = None
    """The teacher of tasks whose ``training_mode`` is ``opd`` (it scores each sampled token) or
    ``sft`` (it samples); ``rlbus rl`` copies ``[orchestrator.teacher.client]`` here. None: such
    tasks come back errored, naming this key."""
    max_result_sends: int = Field(10, ge=1)
    """Times a result is sent without an acknowledgement before the worker drops it (counted in
    ``env_worker/results_dropped``); the orchestrator re-issues a task whose lease expires."""
