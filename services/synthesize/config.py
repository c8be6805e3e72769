"""Config of ``rlbus synthesize`` (one command, not a section of the ``rl`` config)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from rlbus.config import ConfigModel, ServiceConfig
from rlbus.config.base import Secret
from rlbus.environments import UnknownEnvironmentError, check_environment
from rlbus.services.env_worker.config import InferenceClientSettings
from rlbus.services.orchestrator.config import EnvSource


class SynthesizeClientConfig(InferenceClientSettings):
    """The endpoint rollouts are sampled from (with the env-worker's client settings)."""

    api_key: Secret | None = None
    """Key sent as a bearer token; the resolved config holds it redacted (``api_key_var`` keeps it out of
    every file and command line)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """Base URL of the OpenAI-compatible API (ending in ``/v1``) of a vLLM server: ``rlbus inference`` or
    ``vllm serve``. Rollouts stay token-in/token-out as in training, so ``/tokenize`` must answer at its
    root; a chat-only API (most hosted ones) cannot be used."""
    api_key_var: str | None = None
    """Environment variable holding the key, read when ``api_key`` is not given (keeps it off command
    lines and out of files); None reads none."""

    def resolved_api_key(self) -> str | None:
        """``api_key``, else the value of ``api_key_var``; None when neither gives one."""
        if self.api_key is not None or self.api_key_var is None:
            return self.api_key
        return os.environ.get(self.api_key_var) or None


class SynthesizeSamplingConfig(ConfigModel):
    """How every model turn is sampled."""

    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    max_tokens: int = Field(512, ge=1)
    """Completion tokens per model turn."""


class SynthesizeConfig(ServiceConfig):
    """Roll out environments against a model endpoint and write the rollouts as an SFT dataset (JSONL)."""

    SERVICE: ClassVar[str] = "synthesize"
    HELP_HIDDEN: ClassVar[tuple[str, ...]] = ("bus", "max_steps")
    """Fields every command config has that this command does not use."""

    output_dir: Path = Path("outputs")
    """Folder of this command's logs/ and configs/, and of the default ``output``."""
    seed: int = 0
    """Seeds each example's sampling (a rerun samples an example it redoes as the first run did) and is part
    of every row's key: another seed rolls every example out again, beside the rows of the first."""
    model: str | None = None
    """Model name sent with each request and written in each row; None takes the endpoint's only
    model (``/v1/models``)."""
    client: SynthesizeClientConfig = SynthesizeClientConfig()
    """The endpoint to sample from."""
    env: list[EnvSource] = Field(default_factory=list)
    """Environments to roll out (``[[env]]`` tables with ``id`` and ``args``, as ``[[orchestrator.eval.env]]``):
    built-in, installed or ``verifiers:`` ones."""
    num_examples: int | None = Field(None, ge=1)
    """Examples rolled out per environment, its first ones; None: all of them."""
    rollouts_per_example: int = Field(1, ge=1)
    """Rollouts of each example (rollout indices ``0 .. rollouts_per_example - 1``)."""
    min_reward: float | None = None
    """Rows whose reward is below this go to the rejects file (``<output stem>.rejected.jsonl``) instead
    of ``output``; None keeps every rollout that did not error."""
    sampling: SynthesizeSamplingConfig = SynthesizeSamplingConfig()
    """Sampling of every model turn."""
    max_concurrent: int = Field(8, ge=1)
    """Examples rolled out at once (each a group of ``rollouts_per_example`` rollouts); the requests in
    flight are capped by ``client.max_concurrent_requests`` too."""
    env_timeout_s: float = Field(600.0, gt=0)
    """Time one rollout may spend in environment code before it counts as errored (an environment that
    runs its own loop, e.g. ``verifiers:``, spends its generation time in it too)."""
    output: Path | None = None
    """The dataset: a ``.jsonl`` file that ``rlbus sft`` reads as ``data.path``. Rows already in it (and
    in the rejects file) are not rolled out again, so a rerun continues where a stopped run ended.
    None: ``<output_dir>/synthetic.jsonl``."""
    progress: bool = True
    """Show a progress bar on stderr when it is a terminal (``--no-progress``: never)."""

    @field_validator("output")
    @classmethod
    def _jsonl(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix != ".jsonl":
            raise ValueError(f"{str(value)!r} does not end in .jsonl: the dataset is JSON lines (rlbus sft reads "
                             "a .jsonl data.path as such)")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _installed_environments(self) -> SynthesizeConfig:
        # Not part of the `rl` config, so its environments are checked here, before anything starts.
        if not self.env:
            raise ValueError("no environment to roll out: add at least one [[env]] with an `id` "
                             "(e.g. --env '[{\"id\": \"reverse-text\"}]')")  # fmt: skip
        for index, spec in enumerate(self.env):
            try:
                check_environment(spec.id, spec.args)
            except UnknownEnvironmentError as exc:
                raise ValueError(f"env[{index}].id = {spec.id!r}: {exc}") from None
            except (ValueError, TypeError) as exc:
                raise ValueError(f"env[{index}].args = {spec.args!r}: {exc}") from None
        return self

    @property
    def output_path(self) -> Path:
        """Where accepted rows go."""
        return self.output if self.output is not None else self.output_dir / "synthetic.jsonl"

    @property
    def rejects_path(self) -> Path:
        """Where rows below ``min_reward`` go: ``<output stem>.rejected.jsonl`` beside the output."""
        return self.output_path.with_suffix(".rejected.jsonl")
