"""The ``vllm serve`` arguments rlbus derives from its inference config."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.server import vllm_args, vllm_argv


def test_on_the_cpu_a_prefill_is_never_split():
    """vLLM's CPU runner crashes when a seeded request's split prefill is rewound; training requests are seeded."""
    config = InferenceConfig(model="m", max_model_len=4096)
    assert "--no-enable-chunked-prefill" in vllm_argv(config, on_cpu=True)
    assert "--no-enable-chunked-prefill" not in vllm_argv(config, on_cpu=False)
    args = vllm_args(config)  # this test machine runs vLLM on the CPU
    assert args.enable_chunked_prefill is False


def test_vllm_args_can_turn_chunked_prefill_back_on():
    args = vllm_args(InferenceConfig(model="m", vllm_args=["--enable-chunked-prefill"]))
    assert args.enable_chunked_prefill is True


def test_a_compiled_replica_on_a_cpu_without_a_cpp_compiler_runs_eagerly(monkeypatch, tmp_path):
    config = InferenceConfig(model="m", enforce_eager=False)
    assert "--enforce-eager" not in vllm_argv(config, on_cpu=True)  # this machine has g++
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert "--enforce-eager" in vllm_argv(config, on_cpu=True)
    assert "--enforce-eager" not in vllm_argv(config, on_cpu=False)  # GPUs compile without a C++ compiler


def test_kv_cache_gib_becomes_an_explicit_kv_cache_size():
    assert "--kv-cache-memory-bytes" not in vllm_argv(InferenceConfig(model="m"))
    argv = vllm_argv(InferenceConfig(model="m", kv_cache_gib=0.25), on_cpu=True)
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(2**28)
    assert vllm_args(InferenceConfig(model="m", kv_cache_gib=0.25)).kv_cache_memory_bytes == 2**28


def test_a_kv_cache_size_that_is_not_positive_is_refused():
    for bad in (0, -1.0):
        with pytest.raises(ValidationError, match="kv_cache_gib"):
            InferenceConfig(model="m", kv_cache_gib=bad)
