"""verifiers v1 environments run on a real verifiers env server (``verifiers.v1.serve``, in a subprocess)
and driven over its ZeroMQ protocol; their model calls come back to this worker's endpoint and are
sampled token-in/token-out. The environments are the small v1 tasksets of test_verifiers_v1.py,
played by verifiers' bundled ``null`` harness (a PEP 723 program that ``uv`` syncs on first use);
only the model is scripted."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlbus.environments import EnvironmentUnavailable, load_environment
from rlbus.messages import RolloutTask, SamplingParams
from rlbus.services.env_worker.rollout import RolloutRunner
from rlbus.services.env_worker.tokens import HFChatTokenizer, TurnRenderer
from tests.conftest import free_tcp_port
from tests.unit.env_worker.conftest import ScriptedSampler
from tests.unit.env_worker.test_verifiers_v1 import TASKSETS
from tests.verifiers_env_server import env_server, served_env_config

pytest.importorskip("verifiers.v1", reason="needs verifiers 0.4: pip install -e '.[verifiers]'")


@pytest.fixture(scope="module")
def tasksets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The tasksets' folder (importable here and by the servers) and the servers' environment."""
    folder = tmp_path_factory.mktemp("tasksets")
    for name, source in TASKSETS.items():
        (folder / name).write_text(textwrap.dedent(source))
    sys.path.insert(0, str(folder))
    # The harness syncs its program with uv, which the venv's bin folder holds.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    yield folder, {**os.environ, "PYTHONPATH": str(folder), "PATH": path}
    sys.path.remove(str(folder))


def serve(tasksets: tuple[Path, dict[str, str]], name: str, seat: str, log: Path, address: str | None = None) -> Any:
    folder, env = tasksets
    address = address or f"tcp://127.0.0.1:{free_tcp_port()}"
    return env_server(address, served_env_config({"id": name}, seat), log, env=env, cwd=folder)


def run_group(env: Any, sampler: Any, tokenizer: Any, timeout_s: float = 300, **kwargs: Any) -> list[Any]:
    runner = RolloutRunner(sampler, TurnRenderer(HFChatTokenizer(tokenizer)), timeout_s)
    task = RolloutTask(task_id=f"t{time.monotonic_ns()}", env_id="verifiers:x", example_id=2, num_rollouts=2,
                       sampling=SamplingParams(**kwargs), lease_s=60, issued_at=time.time())  # fmt: skip
    return asyncio.run(_run_and_close(runner, task, env))


async def _run_and_close(runner: RolloutRunner, task: RolloutTask, env: Any) -> list[Any]:
    try:
        return await runner.run_task(task, env)
    finally:
        await env.close()  # its sockets belong to this event loop


@pytest.mark.slow
def wait_for_text(path: Path, text: str, timeout_s: float) -> bool:
    """Whether ``text`` shows in the log at ``path`` within ``timeout_s`` (another process writes it)."""
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)  # a file another process appends to offers nothing to wait on
    return True


def test_served_episodes_are_sampled_token_in_token_out(tasksets, tokenizer, tmp_path) -> None:
    again_log, twice_log = tmp_path / "again.log", tmp_path / "twice.log"
    with serve(tasksets, "tiny-v1-again", "player", again_log) as again, \
            serve(tasksets, "tiny-v1-twice", "player", twice_log) as twice:  # fmt: skip
        env = load_environment("verifiers:tiny-v1-again", {"server_address": again.address})
        assert env.num_examples == 4 and env.example(2)["answer"] == "2"
        sampler = ScriptedSampler(tokenizer, lambda prompt, seed: "2")
        rollouts = run_group(env, sampler, tokenizer)
        for rollout in rollouts:
            assert rollout.error is None, (rollout.error, again_log.read_text()[-2000:])
            assert rollout.reward == 1.5 and rollout.reward_breakdown == {"exact": 1.0, "said_two": 1.0}
            assert len(rollout.turns) == 3 and all(t.policy_step == 3 for t in rollout.turns)
            # Each request was exactly the earlier tokens plus the new segment.
            sequence: list[int] = []
            for turn in rollout.turns:
                sequence += turn.prompt_ids
                assert sequence in sampler.prompts
                sequence += turn.completion_ids
            again_segment = "\n<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n"
            assert [tokenizer.decode(t.prompt_ids) for t in rollout.turns[1:]] == [again_segment] * 2
        # Two conversations in one episode: two token sequences of the rollout, the second marked.
        env = load_environment("verifiers:tiny-v1-twice", {"server_address": twice.address})
        sampler = ScriptedSampler(tokenizer, lambda prompt, seed: "2")
        for rollout in run_group(env, sampler, tokenizer):
            assert rollout.error is None, rollout.error
            assert [t.starts_sequence for t in rollout.turns] == [False, True]
            assert all(t.prompt_ids in sampler.prompts for t in rollout.turns)


@pytest.mark.slow
def test_a_run_past_its_time_is_cancelled_and_a_lost_server_errs_its_runs(tasksets, tokenizer, tmp_path,
                                                                          monkeypatch) -> None:  # fmt: skip
    from rlbus.services.env_worker import verifiers_serve

    address, log = f"tcp://127.0.0.1:{free_tcp_port()}", tmp_path / "echo.log"

    class Stalled(ScriptedSampler):
        async def complete(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.Event().wait()  # never answers: the rollout outlives its time

    with serve(tasksets, "tiny-v1-echo", "agent", log, address) as server:
        env = load_environment("verifiers:tiny-v1-echo", {"server_address": address})
        started = time.monotonic()
        for rollout in run_group(env, Stalled(tokenizer, lambda p, s: ""), tokenizer, timeout_s=8):
            assert "outlived env_timeout_s" in rollout.error and address in rollout.error, rollout.error
        assert time.monotonic() - started < 120  # the stalled sampler never answers: only the timeout ends it
        # The server aborted the episodes it was told to (it logs that after the cancel reached it).
        assert wait_for_text(log, "cancelled run", timeout_s=30), log.read_text()[-2000:]

        class Killing(ScriptedSampler):
            async def complete(self, *args: Any, **kwargs: Any) -> Any:
                server.process.kill()  # the server dies while its episodes wait for this answer
                await asyncio.to_thread(server.process.wait)
                return await super().complete(*args, **kwargs)

        for rollout in run_group(env, Killing(tokenizer, lambda p, s: "2"), tokenizer):
            assert f"the env server at {address} disconnected while the episode ran" in rollout.error, rollout.error
    # The same worker-side environment carries on once a server is back at the address.
    with serve(tasksets, "tiny-v1-echo", "agent", log, address) as server:
        for rollout in run_group(env, ScriptedSampler(tokenizer, lambda p, s: "2"), tokenizer):
            assert rollout.error is None and rollout.reward == 1.0, rollout.error

        # A stopped server (or a vanished host) closes no connection: unanswered health requests tell.
        class Stopping(ScriptedSampler):
            async def complete(self, *args: Any, **kwargs: Any) -> Any:
                server.process.send_signal(signal.SIGSTOP)
                return await super().complete(*args, **kwargs)

        monkeypatch.setattr(verifiers_serve, "LIVENESS_INTERVAL_S", 0.5)
        monkeypatch.setattr(verifiers_serve, "LIVENESS_TIMEOUT_S", 2.0)
        try:
            for rollout in run_group(env, Stopping(tokenizer, lambda p, s: "2"), tokenizer):
                assert "answered no health request within 2s while the episode ran" in rollout.error, rollout.error
        finally:
            server.process.send_signal(signal.SIGCONT)


def test_a_server_that_does_not_answer_fails_the_load_naming_its_address(tasksets, monkeypatch) -> None:
    from rlbus.services.env_worker import verifiers_serve

    monkeypatch.setattr(verifiers_serve, "HEALTH_TIMEOUT_S", 1.0)
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    started = time.monotonic()
    with pytest.raises(EnvironmentUnavailable, match=f"env server at {address} did not answer a health request"):
        load_environment("verifiers:tiny-v1-echo", {"server_address": address})
    assert time.monotonic() - started < 10


def test_args_for_the_servers_own_config_are_refused(tasksets) -> None:
    args = {"server_address": "tcp://127.0.0.1:9", "agent.harness.id": "null", "num_examples": 2}
    with pytest.raises(ValueError, match=r"set only `taskset\.\*` and `num_examples`.*\['agent'\]"):
        load_environment("verifiers:tiny-v1-echo", args)


def test_a_local_server_calls_back_on_loopback() -> None:
    from rlbus.services.env_worker.verifiers_serve import callback_host

    assert callback_host("tcp://127.0.0.1:5000") == "127.0.0.1"
    assert callback_host("tcp://localhost:5000") == "127.0.0.1"
    assert callback_host("ipc:///tmp/vf.sock") == "127.0.0.1"
