"""Config of an inference replica (``rlbus inference``, section ``[inference]``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from common.config import ServiceConfig


class InferenceConfig(ServiceConfig):
    """One vLLM replica serving the OpenAI-compatible API."""

    SERVICE: ClassVar[str] = "inference"

    host: str = "127.0.0.1"
    """Interface the HTTP server listens on."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of the OpenAI-compatible API."""
    api_key: str | None = None
    """Bearer key required on every request; None leaves the API open."""
    replica_id: str | None = None
    """Name of this replica on the bus; None derives one from host and port."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Weight dtype inside vLLM; float32 on CPU."""
    max_model_len: int = Field(2048, ge=16)
    """Longest prompt + completion, in tokens."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences vLLM schedules at once."""
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1)
    """Fraction of device memory for vLLM (of host RAM on CPU)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one replica shards the model across."""
    enforce_eager: bool = True
    """Skip graph capture (faster start; required on CPU)."""
