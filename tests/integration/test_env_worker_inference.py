"""Env-worker processes against a real inference replica (``rlbus inference``, vLLM on CPU).

The orchestrator is a small fake with a real ROUTER; everything else is what
users run: ``rlbus env-worker @ cfg.toml`` processes, the tiny
model served by ``rlbus inference``, built-in environments, and an environment
package installed from a temporary folder and found through its entry point.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from rlbus.bus import Bus
from rlbus.config.base import BusConfig
from rlbus.messages import ResultAck, RolloutResult, RolloutTask, SamplingParams, TaskRequest
from tests.conftest import free_tcp_port
from tests.integration.tiny_inference import serve_tiny_inference

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
ROLLOUTS_S = 600
MAX_MODEL_LEN = 1024

ENV_PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "rlbus-echo-env"
        version = "0.1"

        [tool.setuptools]
        py-modules = ["echo_env"]

        [project.entry-points."rlbus.environments"]
        echo = "echo_env:load_environment"
    """,
    "echo_env.py": """
        from rlbus.environments import Environment, Rubric


        def said_something(completion: str) -> float:
            return float(len(completion) > 0)


        def load_environment(num_examples: int = 3, word: str = "hello") -> Environment:
            examples = [{"prompt": f"Repeat: {word} {i}", "answer": word} for i in range(num_examples)]
            return Environment(examples, Rubric([said_something]))
    """,
}


def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


def stop(process: subprocess.Popen) -> int:
    """SIGTERM the process group we started, SIGKILL it if it lingers; the exit code."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model

    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(out, TinyModelConfig(out=out))


@pytest.fixture(scope="module")
def inference_url(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An ``rlbus inference`` replica; ready once its heartbeat says so (no trainer: base weights)."""
    with serve_tiny_inference(tiny_model, tmp_path_factory.mktemp("inference"), MAX_MODEL_LEN) as url:
        yield url


@pytest.fixture(scope="module")
def env_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The echo environment package, pip-installed into a folder of its own."""
    source, target = tmp_path_factory.mktemp("echo-src"), tmp_path_factory.mktemp("echo-target")
    for name, text in ENV_PACKAGE.items():
        (source / name).write_text(textwrap.dedent(text).lstrip())
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return target


def start_worker(folder: Path, name: str, tasks: str, inference_url: str, env_package: Path) -> subprocess.Popen:
    config = folder / f"{name}.toml"
    config.write_text(
        textwrap.dedent(f"""
        output_dir = "{folder / name}"
        worker_id = "{name}"
        inference_urls = ["{inference_url}"]
        max_concurrent_tasks = 2
        env_timeout_s = 60
        [bus]
        linger_ms = 0
        [bus.endpoints]
        orchestrator_tasks = "{tasks}"
        monitor_telemetry = "{endpoint()}"
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(env_package)}
    log = (folder / f"{name}.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "rlbus", "env-worker", "@", str(config)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def serve_tasks(bus: Bus, router: Any, tasks: list[RolloutTask], workers: list[subprocess.Popen]) -> tuple[list, list]:
    """A fake orchestrator: tasks by credit, every result acknowledged."""
    queue, credits = list(tasks), Counter()
    results: list[RolloutResult] = []
    requests: list[TaskRequest] = []
    deadline = time.monotonic() + ROLLOUTS_S
    while len(results) < len(tasks):
        assert time.monotonic() < deadline, f"{len(results)} of {len(tasks)} results within {ROLLOUTS_S}s"
        assert all(w.poll() is None for w in workers), "an env-worker exited"
        received = bus.recv_before(router, time.monotonic() + 1, (TaskRequest, RolloutResult))
        if received is None:
            continue
        identity, message = received
        if isinstance(message, TaskRequest):
            requests.append(message)
            credits[identity] += message.num_tasks
        elif message.task_id not in {r.task_id for r in results}:
            results.append(message)
            bus.send(router, ResultAck(task_ids=[message.task_id]), identity)
        while queue and credits[identity] > 0:
            credits[identity] -= 1
            bus.send(router, queue.pop(0), identity)
    return results, requests


def task(number: int, env_id: str, env_args: dict | None = None, num_rollouts: int = 2) -> RolloutTask:
    return RolloutTask(
        task_id=f"t{number}", env_id=env_id, env_args=env_args or {}, example_id=number % 3, num_rollouts=num_rollouts,
        sampling=SamplingParams(max_tokens=24, seed=number), lease_s=600, issued_at=time.time(),
    )  # fmt: skip


def test_env_workers_roll_out_against_real_inference(inference_url: str, env_package: Path, tiny_model: Path,
                                                     tmp_path: Path) -> None:  # fmt: skip
    from transformers import AutoTokenizer

    from rlbus.environments import load_environment

    tasks = [
        task(0, "reverse-text", {"num_examples": 10}), task(1, "reverse-text", {"num_examples": 10}),
        task(2, "guess-number", {"num_examples": 5, "max_turns": 3}), task(3, "calculator", {"num_examples": 5}),
        task(4, "echo", {"word": "bus"}), task(5, "arithmetic", {"num_examples": 5}),
    ]  # fmt: skip
    with Bus(BusConfig(linger_ms=0)) as bus:
        address = endpoint()
        router = bus.bind(zmq.ROUTER, address, role="tasks")
        workers = [start_worker(tmp_path, f"w{i}", address, inference_url, env_package) for i in range(2)]
        try:
            results, requests = serve_tasks(bus, router, tasks, workers)
        finally:
            exit_codes = [stop(worker) for worker in workers]
    assert exit_codes == [0, 0], [(tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(2)]
    assert {r.task_id for r in results} == {t.task_id for t in tasks}
    # num_tasks=0 is a worker's keepalive (sent every heartbeat interval); real requests ask for its credit.
    credit_requests = [r for r in requests if r.num_tasks > 0]
    assert {r.num_tasks for r in credit_requests} <= {1, 2} and {r.worker_id for r in credit_requests} == {"w0", "w1"}

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    by_id = {t.task_id: t for t in tasks}
    for result in results:
        spec = by_id[result.task_id]
        env = load_environment(spec.env_id, spec.env_args) if spec.env_id != "echo" else None
        assert len(result.rollouts) == 2
        for rollout in result.rollouts:
            assert rollout.error is None, rollout.error
            turns = rollout.turns
            assert sum(len(t.prompt_ids) + len(t.completion_ids) for t in turns) <= MAX_MODEL_LEN
            for turn in turns:
                assert len(turn.completion_logprobs) == len(turn.completion_ids) == len(turn.completion_mask) > 0
                assert all(lp <= 0 for lp in turn.completion_logprobs) and turn.policy_step == 0
            if env is not None:  # turn 0 is the chat template's rendering of the example's prompt
                messages = env.prompt_messages(env.example(result.example_id))
                rendered = tokenizer.apply_chat_template(messages, tools=env.tools or None, add_generation_prompt=True,
                                                         return_dict=False)  # fmt: skip
                assert turns[0].prompt_ids == rendered
            if len(turns) == 1:  # the text is the decoded tokens (vLLM holds back a trailing partial character)
                decoded = tokenizer.decode(turns[0].completion_ids, skip_special_tokens=True)
                assert decoded.startswith(rollout.completion_text)
                assert set(decoded[len(rollout.completion_text) :]) <= {"\ufffd"}
            for previous, turn in itertools.pairwise(turns):  # later turns add only the new segment
                segment = tokenizer.decode(turn.prompt_ids)
                closing = "" if previous.completion_ids[-1] == im_end else "<|im_end|>"
                assert segment.startswith(closing + "\n<|im_start|>user\n") and segment.endswith(
                    "<|im_end|>\n<|im_start|>assistant\n"
                )  # fmt: skip
    guess = next(r for r in results if r.env_id == "guess-number")
    assert any(len(r.turns) > 1 for r in guess.rollouts)  # the game went on after a wrong or missing guess
    echo = next(r for r in results if r.env_id == "echo")
    assert echo.rollouts[0].prompt_text == "Repeat: bus 1"
