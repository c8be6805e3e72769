"""inference.worker_in_engine_process asks vLLM for its uniproc executor through the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.executor import (
    AOT_VARIABLE,
    METHOD_VARIABLE,
    THREADS_BIND_VARIABLE,
    VARIABLE,
    bind_cpu_threads,
    count_cores,
    fork_engine_core,
    place_worker,
    skip_broken_aot_cache,
)


def test_one_worker_runs_in_the_engine_process_by_default():
    config, environ = InferenceConfig(model="m"), {}
    assert config.worker_in_engine_process
    assert place_worker(config.worker_in_engine_process, config.tensor_parallel_size, environ)
    assert environ == {VARIABLE: "0"}


def test_several_workers_or_the_setting_off_leave_vllm_its_choice():
    for in_engine, workers in ((False, 1), (True, 2)):
        environ: dict[str, str] = {}
        assert not place_worker(in_engine, workers, environ) and environ == {}


def test_a_value_the_user_set_wins():
    environ = {VARIABLE: "1"}
    assert not place_worker(True, 1, environ) and environ == {VARIABLE: "1"}


def test_cpu_threads_bind_reaches_vllm_and_bad_values_are_refused():
    environ: dict[str, str] = {}
    assert not bind_cpu_threads(InferenceConfig(model="m").cpu_threads_bind, environ) and environ == {}
    assert bind_cpu_threads(InferenceConfig(model="m", cpu_threads_bind="0-1").cpu_threads_bind, environ)
    assert environ == {THREADS_BIND_VARIABLE: "0-1", "OMP_NUM_THREADS": "2"}
    with pytest.raises(ValidationError, match="cpu_threads_bind"):
        InferenceConfig(model="m", cpu_threads_bind="all; rm -rf /")
    for malformed in ("0--", "-1", "0,", "|0"):
        with pytest.raises(ValidationError, match="cpu_threads_bind"):
            InferenceConfig(model="m", cpu_threads_bind=malformed)


def test_count_cores_reads_vllms_bind_syntax():
    assert [count_cores(v) for v in ("0", "1", "0-3,6", "0-1|2-3", "auto", "nobind")] == [1, 1, 5, 2, None, None]


def test_aot_compile_artifacts_are_off_on_cpu_only_and_a_user_value_wins():
    environ: dict[str, str] = {}
    assert skip_broken_aot_cache(on_cpu=True, environ=environ) and environ == {AOT_VARIABLE: "0"}
    environ = {}
    assert not skip_broken_aot_cache(on_cpu=False, environ=environ) and environ == {}
    environ = {AOT_VARIABLE: "1"}
    assert not skip_broken_aot_cache(on_cpu=True, environ=environ) and environ == {AOT_VARIABLE: "1"}


class _Platform:
    """Stands in for vLLM's CpuPlatform: its config check asks for spawn, as vLLM 0.32's does."""

    environ: dict[str, str] = {}  # noqa: RUF012 - replaced per test

    @classmethod
    def check_and_update_config(cls, vllm_config: object) -> None:
        cls.environ[METHOD_VARIABLE] = "spawn"


def test_the_engine_core_is_forked_after_the_platform_asked_for_spawn():
    environ = {VARIABLE: "0"}
    platform = type("Platform", (_Platform,), {"environ": environ})
    assert fork_engine_core(platform, environ)
    platform().check_and_update_config(object())  # called on the instance, as vLLM's current_platform
    assert environ[METHOD_VARIABLE] == "fork"


def test_a_user_method_or_a_worker_process_keeps_spawn():
    for environ in ({VARIABLE: "0", METHOD_VARIABLE: "spawn"}, {}, {VARIABLE: "1"}):
        platform = type("Platform", (_Platform,), {"environ": environ})
        assert not fork_engine_core(platform, environ)
        platform.check_and_update_config(object())
        assert environ[METHOD_VARIABLE] == "spawn"


def test_the_thread_binding_is_in_the_environment_before_torch_loads():
    """``rlbus inference`` applies ``cpu_threads_bind`` before importing the server (and torch): an
    engine core forked from it keeps the OpenMP team size torch read when it loaded."""
    probe = textwrap.dedent("""
        import os, sys, types
        seen = {}
        def run_inference(config):
            seen.update(omp=os.environ.get("OMP_NUM_THREADS"), torch="torch" in sys.modules)
            return 0
        sys.modules["rlbus.services.inference.server"] = types.SimpleNamespace(run_inference=run_inference)
        from rlbus.services.inference.config import InferenceConfig
        from rlbus.services.inference.main import run
        assert run(InferenceConfig(model="m", cpu_threads_bind="0-2")) == 0
        print(seen["omp"], seen["torch"])
    """)  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", THREADS_BIND_VARIABLE)}
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, env=environ, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "False"]
