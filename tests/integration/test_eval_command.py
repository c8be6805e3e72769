"""``rlbus eval`` as a real process against a real HTTP server standing in for vLLM
(tests/integration/fake_vllm.py) whose policy reverses texts of even length correctly and
fails the others, so avg@k and pass@k are known exactly from the examples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from rlbus.environments import load_environment

from .eval_run import run_rlbus_eval
from .fake_vllm import FakePolicy, even_length_answer, serve_fake_vllm

pytestmark = pytest.mark.slow


@pytest.fixture
def fake_vllm() -> Iterator[str]:
    with serve_fake_vllm(FakePolicy(even_length_answer)) as url:
        yield url


def test_rlbus_eval_reports_avg_and_pass_at_k_of_an_endpoint(fake_vllm, tmp_path):
    args = {"num_examples": 12, "seed": 5}
    config = {
        "output_dir": str(tmp_path),
        "sampling": {"max_tokens": 64},
        "eval": {"env": [{"id": "reverse-text", "args": args, "num_examples": 10, "rollouts_per_example": 2}]},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    result, metrics = run_rlbus_eval(config, fake_vllm, env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    environment = load_environment("reverse-text", args)
    solved = [len(environment.example(i)["prompt"]) % 2 == 0 for i in range(10)]
    assert 0 < sum(solved) < 10, "the examples must mix solved and failed ones"
    assert metrics["eval/reverse-text/avg@2"] == pytest.approx(sum(solved) / 10)
    assert metrics["eval/reverse-text/pass@2"] == pytest.approx(sum(solved) / 10)
    assert metrics["eval/reverse-text/num_examples"] == 10
    assert metrics["eval/reverse-text/errored_rollouts"] == 0
