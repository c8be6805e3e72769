"""``rlbus synthesize`` as a real process against a real ``rlbus inference`` on the tiny model.

It rolls out a single-turn, a multi-turn and a tool environment (and, where verifiers 0.4 with
TextArena is installed, a TextArena game), ``rlbus sft`` trains on the file as it is, a run
SIGKILLed mid-way is finished by a rerun without duplicates, and a bad endpoint (nothing
listening, or answers without tokens) is reported. One replica serves the whole module.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_tcp_port

from .malformed_endpoint import serve_malformed_endpoint
from .test_verifiers_textarena import textarena_env  # noqa: F401 - a fixture of this module's TextArena test
from .tiny_inference import serve_tiny_inference

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
ENVS = [{"id": "reverse-text"}, {"id": "guess-number", "args": {"max_turns": 3}}, {"id": "calculator"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model

    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(out, TinyModelConfig(out=out))


@pytest.fixture(scope="module")
def inference_url(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # 2048 tokens: TextArena's prompts take ~1,100 of the tiny model's byte-level tokens.
    with serve_tiny_inference(tiny_model, tmp_path_factory.mktemp("inference"), max_model_len=2048) as url:
        yield url


def synthesize_argv(url: str, out: Path, envs: list[dict], *flags: str) -> list[str]:
    return [sys.executable, "-m", "rlbus", "synthesize", "--client.base-url", url, "--output-dir", str(out),
            "--env", json.dumps(envs), "--sampling.max-tokens", "16", *flags]  # fmt: skip


def synthesize(url: str, out: Path, envs: list[dict], *flags: str, env: dict | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run(synthesize_argv(url, out, envs, *flags), cwd=ROOT, env=env or CLEAN_ENV,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def keys(rows: list[dict]) -> list[tuple]:
    return [(r["env_id"], json.dumps(r["env_args"]), r["example_id"], r["rollout_index"], r["seed"]) for r in rows]


@pytest.mark.slow
@pytest.mark.vllm
def test_synthesize_writes_a_dataset_sft_trains_on(inference_url: str, tiny_model: Path, tmp_path: Path) -> None:
    done = synthesize(inference_url, tmp_path, ENVS, "--num-examples", "3", "--rollouts-per-example", "2",
                      "--min-reward", "-1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(tmp_path / "synthetic.jsonl")
    assert len(rows) == 18 and len(set(keys(rows))) == 18
    assert not (tmp_path / "synthetic.rejected.jsonl").read_text()  # every reward is at least -1
    by_env = {spec["id"]: [r for r in rows if r["env_id"] == spec["id"]] for spec in ENVS}
    assert {env: len(found) for env, found in by_env.items()} == {"reverse-text": 6, "guess-number": 6, "calculator": 6}
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[-1] == "assistant" and math.isfinite(row["reward"]) and row["model"] == str(tiny_model)
        assert row["metrics"]["num_turns"] == roles.count("assistant")
    # Multi-turn: the game answered each of the random model's (format-less) guesses, three turns in all.
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] * 3 for r in by_env["guess-number"])
    assert all(r["tools"][0]["function"]["name"] == "calculate" for r in by_env["calculator"])
    assert all("tools" not in r for r in by_env["reverse-text"])

    sft_out = tmp_path / "sft"
    trained = subprocess.run(
        [sys.executable, "-m", "rlbus", "sft", "--model", str(tiny_model), "--output-dir", str(sft_out),
         "--data.path", str(tmp_path / "synthetic.jsonl"), "--max-steps", "2", "--batch-size", "6", "--seq-len", "1024",
         "--bus.endpoints.monitor-telemetry", f"tcp://127.0.0.1:{free_tcp_port()}"],
        cwd=ROOT, env=CLEAN_ENV, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    steps = read_rows(sft_out / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2]
    assert all(math.isfinite(s["sft/loss/mean"]) and s["sft/progress/loss_tokens"] > 0 for s in steps)


@pytest.mark.slow
@pytest.mark.vllm
def test_a_killed_run_is_finished_by_a_rerun_without_duplicates(inference_url: str, tmp_path: Path) -> None:
    envs, total = [{"id": "guess-number", "args": {"max_turns": 3}}], 16 * 2
    flags = ("--num-examples", "16", "--rollouts-per-example", "2", "--max-concurrent", "1")
    output = tmp_path / "synthetic.jsonl"
    process = subprocess.Popen(synthesize_argv(inference_url, tmp_path, envs, *flags), cwd=ROOT, env=CLEAN_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not output.exists() or output.read_text().count("\n") < 4:
            assert process.poll() is None, "synthesize ended before it was killed"
            assert time.monotonic() < deadline, "no 4 rows within 300 s"
            time.sleep(0.05)  # watching a file another process writes: nothing to wait on but the file
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    before = output.read_text()
    complete = before[: before.rfind("\n") + 1]
    assert 4 <= complete.count("\n") < total, "the kill must come mid-run"
    # As if the kill had come mid-write too (it may or may not have): a torn last line.
    output.write_text(complete + before.splitlines()[0][:40])

    rerun = synthesize(inference_url, tmp_path, envs, *flags)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "cut off a partly written last line (40 bytes" in rerun.stderr
    assert f"{total - complete.count(chr(10))} rollouts to do" in rerun.stderr
    after = output.read_text()
    assert after.startswith(complete)  # rows written before the kill stay as they were
    rows = read_rows(output)
    assert len(rows) == total and len(set(keys(rows))) == total
    assert sorted((r["example_id"], r["rollout_index"]) for r in rows) == [(e, i) for e in range(16) for i in range(2)]

    again = synthesize(inference_url, tmp_path, envs, *flags)
    assert again.returncode == 0 and "0 rollouts to do" in again.stderr and output.read_text() == after


@pytest.mark.slow
@pytest.mark.vllm
def test_synthesize_records_a_verifiers_textarena_game(inference_url: str, textarena_env: dict,  # noqa: F811
                                                       tmp_path: Path) -> None:  # fmt: skip
    hangman = {"id": "verifiers:textarena",
               "args": {"num_examples": 2, "player.harness.id": "null", "taskset.game": "Hangman-v0"}}  # fmt: skip
    done = synthesize(inference_url, tmp_path, [hangman], "--rollouts-per-example", "2", env=textarena_env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(tmp_path / "synthetic.jsonl")
    assert len(rows) == 4 and len(set(keys(rows))) == 4
    for row in rows:
        # The game rejected the random model's move and let it move again: a multi-turn conversation.
        assert [m["role"] for m in row["messages"]][:5] == ["system", "user", "assistant", "user", "assistant"]
        assert "You are playing Hangman" in row["messages"][1]["content"]
        assert "game_reward" in row["metrics"] and row["env_args"]["taskset.game"] == "Hangman-v0"


def test_an_unreachable_endpoint_is_named_before_anything_is_written(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_tcp_port()}/v1"
    done = synthesize(url, tmp_path, [{"id": "reverse-text"}], "--num-examples", "2")
    assert done.returncode == 1
    assert f"cannot reach the endpoint {url}/models" in done.stderr
    assert not (tmp_path / "synthetic.jsonl").exists()


def test_answers_without_tokens_error_the_rollouts_and_write_no_row(tmp_path: Path) -> None:
    with serve_malformed_endpoint() as url:
        done = synthesize(url, tmp_path, [{"id": "reverse-text"}], "--num-examples", "3", "--client.max-retries", "0")
    assert done.returncode == 1
    assert "rlbus synthesize: 3 of 3 rollouts errored and were not written" in done.stderr
    assert "without choices[i].token_ids" in done.stderr and "rerun the same command" in done.stderr
    assert (tmp_path / "synthetic.jsonl").read_text() == ""


def test_an_environment_that_does_not_load_is_named_before_the_dataset_is_opened(tmp_path: Path) -> None:
    envs = [{"id": "reverse-text"}, {"id": "verifiers:no-such-taskset"}]
    with serve_malformed_endpoint() as url:  # it passes the start-up check: the environment fails after it
        done = synthesize(url, tmp_path, envs)
    assert done.returncode == 1
    assert "rlbus synthesize: env[1] 'verifiers:no-such-taskset' cannot be loaded" in done.stderr
    assert not (tmp_path / "synthetic.jsonl").exists()
