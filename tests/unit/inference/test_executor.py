"""inference.worker_in_engine_process asks vLLM for its uniproc executor through the environment."""

from __future__ import annotations

from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.executor import VARIABLE, place_worker


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
