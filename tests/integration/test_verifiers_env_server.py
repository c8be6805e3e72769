"""A published verifiers 0.4 environment served by verifiers' own env server (``verifiers.v1.serve``)
in a process of its own: ``rlbus rl`` trains the tiny model on TextArena's Hangman and WordLadder
through it, every model call coming back to the env-worker and sampled token-in/token-out; and
``rlbus eval`` naming an address where no server answers fails at once, saying so.

Needs what test_verifiers_textarena.py needs (verifiers 0.4 with textarena, vLLM, the ``scowl``
word lists for NLTK's ``words`` corpus, ``uv`` for the ``null`` harness).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.conftest import free_tcp_port
from tests.integration.small_run import loopback_endpoints
from tests.verifiers_env_server import env_server, served_env_config

from .eval_run import run_rlbus_eval
from .test_verifiers_textarena import nltk_words_corpus, read_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 2
ENV_ID = "verifiers:textarena"
GAMES = {"Hangman-v0": "You are playing Hangman", "WordLadder-v0": "reach the target word"}


@pytest.fixture(scope="module")
def process_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment variables of rlbus and the env server: NLTK_DATA, and uv on PATH."""
    pytest.importorskip("verifiers.v1", reason="needs verifiers 0.4: pip install 'verifiers[ta]>=0.4,<0.5'")
    pytest.importorskip("textarena", reason="pip install 'verifiers[ta]'")
    data = nltk_words_corpus(tmp_path_factory.mktemp("nltk_data"))
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    return env | {"NLTK_DATA": str(data), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def textarena_server(process_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """One TextArena env server: the game is part of each task's data, so it serves every game."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    config = served_env_config({"id": "textarena", "game": "Hangman-v0"}, "player")
    with env_server(address, config, tmp_path / "env_server.log", env=process_env):
        yield address


def rl_config(tmp_path: Path, model: Path, address: str) -> Path:
    envs = [{"id": ENV_ID, "server_address": address, "args": {"num_examples": 8, "taskset.game": game}}
            for game in GAMES]  # fmt: skip
    config = {
        "model": str(model), "output_dir": str(tmp_path / "run"), "max_steps": MAX_STEPS, "num_env_workers": 1,
        "inference": {"port": free_tcp_port(), "max_model_len": 2048},
        "trainer": {"optimizer": {"lr": 1e-5}},
        "orchestrator": {
            "batch_size": 8, "rollouts_per_example": 4, "seq_len": 2048, "max_async_level": 0,
            "sampling": {"max_tokens": 32}, "advantage": {"length_penalty": 0.5}, "train": {"env": envs},
        },
        "monitor": {"console": True},
    }  # fmt: skip
    path = tmp_path / "rl.toml"
    path.write_text(f"{tomli_w.dumps(config)}\n[bus.endpoints]\n{loopback_endpoints()}\n")
    return path


@pytest.mark.vllm
def test_rl_trains_through_a_verifiers_env_server(process_env, textarena_server, tmp_path) -> None:
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    result = subprocess.run(
        [sys.executable, "-m", "rlbus", "rl", "@", str(rl_config(tmp_path, model, textarena_server))],
        cwd=ROOT, env=process_env, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    run = tmp_path / "run"
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_jsonl(run / "steps.jsonl")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1)), [r["step"] for r in rows]
    for row in rows:
        assert row["complete"] and "trainer/loss/mean" in row, row
        # Every episode ran to its end on the server and its judge scored it; none errored.
        assert 0.0 <= row[f"orchestrator/reward/{ENV_ID}/game_reward/mean"] <= 1.0, row
        assert row["orchestrator/errored_rollouts"] == 0, row
        assert row["orchestrator/num_completion_tokens/sum"] > 0, row
        # The trainer recomputed the sampled tokens' logprobs: the tokens are the ones vLLM sampled.
        assert row["trainer/mismatch_kl/mean"] < 0.01, row
    samples = read_jsonl(run / "samples.jsonl")
    for game, prompt_text in GAMES.items():
        assert any(prompt_text in s["prompt"] for s in samples), f"no {game} sample in {len(samples)}"
    # Multi-turn, one token sequence per rollout: the game answered the model, which moved again.
    assert all(s["completion"].count("[assistant]") >= 2 for s in samples), samples[0]["completion"]


def test_eval_with_no_server_at_the_address_fails_fast_naming_it(process_env, tmp_path) -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"  # nothing listens there
    args = {"num_examples": 2, "taskset.game": "Hangman-v0"}
    config = {"output_dir": str(tmp_path),
              "eval": {"env": [{"id": ENV_ID, "server_address": address, "args": args, "num_examples": 2}]}}  # fmt: skip
    started = time.monotonic()
    result, _ = run_rlbus_eval(config, "http://127.0.0.1:9/v1", process_env, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"env server at {address} did not answer a health request within 10s" in last_line, last_line
    assert time.monotonic() - started < 60
