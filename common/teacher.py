"""The teacher of on-policy distillation and of SFT from a teacher: its config and its wire format.

``orchestrator.training_mode`` picks what a training task does (docs/training.md):

- ``rl``: the policy samples, the environment's reward makes the advantages (the default).
- ``opd``: the policy samples; the teacher scores every sampled token. The teacher is asked once
  per rollout with the rollout's whole token sequence as the prompt of a ``/v1/completions``
  request with ``max_tokens = 1`` and ``prompt_logprobs = 0``: vLLM then returns, for every
  position after the first, the logprob of the token that is really there. Only vLLM (``rlbus
  inference`` or ``vllm serve``) returns prompt logprobs, and the ids only mean the same thing when
  the teacher's tokenizer is the student's.
- ``sft``: the teacher samples (any OpenAI-compatible ``/v1/chat/completions``) and the student
  learns its answers with the negative log-likelihood.

The orchestrator holds ``[orchestrator.teacher]``; env-workers, which talk to the teacher, hold the
same client settings as ``[env_worker.teacher]`` (``rlbus rl`` copies them there).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from rlbus.config import ConfigModel
from rlbus.config.base import Secret

TrainingMode = Literal["rl", "opd", "sft"]
TEACHER_MODES: tuple[str, ...] = ("opd", "sft")
"""Modes that need a teacher."""


class TeacherError(ValueError):
    """The teacher answered something that cannot be used; the text names its URL and what is wrong."""


class TeacherClientConfig(ConfigModel):
    """How to reach the teacher: an OpenAI-compatible server (``opd`` needs vLLM's prompt logprobs)."""

    base_url: str
    """The teacher's OpenAI-compatible API, ending in ``/v1`` (``http://127.0.0.1:8001/v1``)."""
    model: str
    """The teacher's served model name, sent in every request."""
    api_key: Secret | None = None
    """Bearer key of the teacher's API (written redacted: pass it as ``RLBUS_<SECTION>__..._API_KEY``)."""
    max_concurrent_requests: int = Field(16, ge=1)
    """Requests in flight to the teacher at once, per env-worker."""
    request_timeout_s: float = Field(300.0, gt=0)
    """Timeout of one teacher request."""
    max_retries: int = Field(3, ge=0)
    """Retries after connection errors, 429 and 5xx answers, with backoff."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL; give the API base, e.g. http://127.0.0.1:8001/v1")
        return value.rstrip("/")


def scoring_body(model: str, token_ids: list[int]) -> dict[str, Any]:
    """The ``/v1/completions`` request that makes vLLM score ``token_ids`` (one token is generated:
    vLLM refuses ``max_tokens = 0`` without ``echo``)."""
    return {"model": model, "prompt": list(token_ids), "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}


def prompt_token_logprobs(data: Any, token_ids: list[int], url: str) -> list[float | None]:
    """[N] the teacher's logprob of each of ``token_ids`` given the ones before it (None at 0, which
    has no context), read from a ``/v1/completions`` answer to :func:`scoring_body`."""
    choices = data.get("choices") if isinstance(data, dict) else None
    entries = choices[0].get("prompt_logprobs") if isinstance(choices, list) and choices and isinstance(
        choices[0], dict) else None  # fmt: skip
    if not isinstance(entries, list):
        raise TeacherError(f"{url} answered without choices[0].prompt_logprobs: the teacher must return prompt "
                           "logprobs (a vLLM server: `rlbus inference` or `vllm serve`)")  # fmt: skip
    if len(entries) != len(token_ids):
        raise TeacherError(f"{url} returned prompt logprobs for {len(entries)} tokens, the prompt has "
                           f"{len(token_ids)}: did it re-tokenize the token ids?")  # fmt: skip
    logprobs: list[float | None] = [None]
    for position in range(1, len(token_ids)):
        logprobs.append(_logprob_of(entries[position], token_ids[position], position, url))
    return logprobs


def _logprob_of(entry: Any, token_id: int, position: int, url: str) -> float:
    # Keys are token ids as JSON strings; the dict may also hold the top-ranked tokens.
    value = entry.get(str(token_id)) if isinstance(entry, dict) else None
    logprob = value.get("logprob") if isinstance(value, dict) else value
    if isinstance(logprob, bool) or not isinstance(logprob, int | float) or math.isnan(logprob):
        raise TeacherError(f"{url}: prompt_logprobs[{position}] holds no logprob for token {token_id}: "
                           f"{str(entry)[:200]}")  # fmt: skip
    return float(logprob)
