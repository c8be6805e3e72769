"""A published verifiers 0.4 environment, unchanged: the TextArena games bundled in verifiers
(``verifiers.v1.tasksets.textarena``, extra ``verifiers[ta]``) trained by ``rlbus rl`` and
evaluated by ``rlbus eval``.

Needs an interpreter where verifiers 0.4 with textarena and (for the run) vLLM are installed
together, and the ``scowl`` word lists (Debian: ``apt-get install scowl``): TextArena's word
games read NLTK's ``words`` corpus, which ``nltk.download`` cannot fetch here, so
:func:`nltk_words_corpus` builds one from SCOWL. The games' model turns run through verifiers'
bundled ``null`` harness, a PEP 723 program that ``uv`` syncs from PyPI on first use.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from rlbus.jsonl import read_json_objects as read_jsonl
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from tests.conftest import free_tcp_port
from tests.integration.small_run import loopback_endpoints

from .eval_run import run_rlbus_eval
from .fake_vllm import FakePolicy, serve_fake_vllm
from .tiny_inference import serve_tiny_inference

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCOWL = Path("/usr/share/dict/scowl")
MAX_STEPS = 3
ENV_ID = "verifiers:textarena"
# Scalar args (dotted keys for the v1 env config's tables): the game and the seat's harness.
GAME_ARGS = {"num_examples": 8, "player.harness.id": "null"}
GAMES = {"Hangman-v0": "You are playing Hangman", "WordLadder-v0": "reach the target word"}


def nltk_words_corpus(root: Path) -> Path:
    """An NLTK data folder whose ``corpora/words`` holds ``en`` (SCOWL sizes 10-50, about
    60,000 words) and ``en-basic`` (SCOWL size 10, the 4,000 most common lower-case words),
    standing in for NLTK's own lists (Webster's 2nd and Ogden's Basic English)."""
    missing = [size for size in (10, 20, 35, 40, 50) if not (SCOWL / f"english-words.{size}").exists()]
    if missing:
        pytest.skip(f"no SCOWL word lists {missing} under {SCOWL}: apt-get install scowl")
    words = root / "corpora" / "words"
    words.mkdir(parents=True, exist_ok=True)

    def ascii_words(sizes: tuple[int, ...], lower_only: bool) -> list[str]:
        lines = (line.strip() for size in sizes for line in (SCOWL / f"english-words.{size}").read_text("latin-1")
                 .splitlines())  # fmt: skip
        return sorted({w for w in lines if w.isascii() and w.isalpha() and (w.islower() or not lower_only)})

    (words / "en").write_text("\n".join(ascii_words((10, 20, 35, 40, 50), lower_only=False)) + "\n")
    (words / "en-basic").write_text("\n".join(ascii_words((10,), lower_only=True)) + "\n")
    return root


@pytest.fixture(scope="module")
def textarena_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment variables the run's processes need: NLTK_DATA, and uv on PATH."""
    pytest.importorskip("verifiers.v1", reason="needs verifiers 0.4: pip install 'verifiers[ta]>=0.4,<0.5'")
    pytest.importorskip("textarena", reason="pip install 'verifiers[ta]'")
    data = nltk_words_corpus(tmp_path_factory.mktemp("nltk_data"))
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")}
    yield env | {"NLTK_DATA": str(data), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def rl_config(tmp_path: Path, model: Path) -> Path:
    config = {
        "model": str(model), "output_dir": str(tmp_path / "run"), "max_steps": MAX_STEPS, "num_env_workers": 1,
        "inference": {"port": free_tcp_port(), "max_model_len": 2048},
        "trainer": {"optimizer": {"lr": 1e-5}},
        "orchestrator": {
            "batch_size": 8, "rollouts_per_example": 4, "seq_len": 2048, "max_async_level": 0,
            "sampling": {"max_tokens": 32}, "advantage": {"length_penalty": 0.5},
            "train": {"env": [{"id": ENV_ID, "args": GAME_ARGS | {"taskset.game": game}} for game in GAMES]},
            # The eval machinery on the same published env, sampled by the real vLLM replica.
            "eval": {"interval": MAX_STEPS, "env": [{"id": ENV_ID, "args": GAME_ARGS | {"taskset.game": "Hangman-v0"},
                                                     "num_examples": 4, "rollouts_per_example": 2}]},
        },
        "monitor": {"console": True},
    }  # fmt: skip
    path = tmp_path / "rl.toml"
    path.write_text(f"{tomli_w.dumps(config)}\n[bus.endpoints]\n{loopback_endpoints()}\n")
    return path


@pytest.mark.vllm
def test_rl_trains_the_tiny_model_on_two_textarena_games(textarena_env, tmp_path):
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    result = subprocess.run(
        [sys.executable, "-m", "rlbus", "rl", "@", str(rl_config(tmp_path, model))],
        cwd=ROOT, env=textarena_env, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    run = tmp_path / "run"
    assert result.returncode == 0, result.stderr[-4000:]
    # Step 0 holds the base model's eval alone.
    rows = [row for row in read_jsonl(run / "steps.jsonl") if row["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1)), [r["step"] for r in rows]
    for row in rows:
        assert row["complete"] and "trainer/loss/mean" in row, row
        # Every rollout's episode ran to its end: the game's judge scored it, none errored.
        assert 0.0 <= row[f"orchestrator/reward/{ENV_ID}/game_reward/mean"] <= 1.0, row
        assert row["orchestrator/errored_rollouts"] == 0, row
        assert row["orchestrator/num_completion_tokens/sum"] > 0, row
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if f"eval/{ENV_ID}/avg@2" in r]
    assert evals, "no eval of the Hangman env in metrics.jsonl"
    for row in evals:
        assert 0.0 <= row[f"eval/{ENV_ID}/avg@2"] <= row[f"eval/{ENV_ID}/pass@2"] <= 1.0, row
        assert row[f"eval/{ENV_ID}/num_examples"] == 4, row
    samples = read_jsonl(run / "samples.jsonl")
    for game, prompt_text in GAMES.items():
        assert any(prompt_text in s["prompt"] for s in samples), f"no {game} sample in {len(samples)}"
    # Multi-turn: the game answered the model's first move (an invalid one, from a random model),
    # and the model moved again, in the same token sequence (one training sample per rollout).
    assert all(s["completion"].count("[assistant]") >= 2 for s in samples), samples[0]["completion"]


def hangman_words(num_examples: int, nltk_data: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The secret word of each Hangman example: its seed is its index (TextArenaTaskset)."""
    import nltk
    import textarena as ta

    monkeypatch.setattr(nltk.data, "path", [nltk_data, *nltk.data.path])

    words = []
    for seed in range(num_examples):
        random.seed(seed)
        game = ta.make(env_id="Hangman-v0")
        game.reset(num_players=1)
        words.append(game.state.game_state["target_word"])
    return words


def test_rlbus_eval_reports_avg_and_pass_at_k_on_hangman(textarena_env, tmp_path, monkeypatch):
    # The policy guesses E on every turn: after one warning for the repeated guess the game
    # ends, scored by the share of the word revealed, so each example's reward is known.
    with serve_fake_vllm(FakePolicy(lambda user_text: "[E]"), max_model_len=2048) as url:
        args = GAME_ARGS | {"taskset.game": "Hangman-v0"}
        config = {"output_dir": str(tmp_path), "sampling": {"max_tokens": 16},
                  "eval": {"env": [{"id": ENV_ID, "args": args, "num_examples": 6, "rollouts_per_example": 2}]}}  # fmt: skip
        result, metrics = run_rlbus_eval(config, url, textarena_env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    shares = [word.lower().count("e") / len(word) for word in hangman_words(6, textarena_env["NLTK_DATA"], monkeypatch)]
    assert 0 < sum(shares) and min(shares) < 1, "the words must mix rewarded and unrewarded ones"
    assert metrics[f"eval/{ENV_ID}/avg@2"] == pytest.approx(sum(shares) / 6)
    assert metrics[f"eval/{ENV_ID}/pass@2"] == pytest.approx(sum(s == 1 for s in shares) / 6)
    assert metrics[f"eval/{ENV_ID}/errored_rollouts"] == 0
    assert f"eval/{ENV_ID}/avg@2 = " in result.stderr and f"eval/{ENV_ID}/pass@2 = " in result.stderr


@pytest.mark.vllm
def test_rlbus_eval_on_a_real_replica_scores_every_hangman_game(textarena_env, tmp_path):
    # The known-reward test above pins the arithmetic; this one runs the same command against vLLM.
    model = build_tiny_model(tmp_path / "tiny", TinyModelConfig(out=tmp_path / "tiny"))
    (tmp_path / "inference").mkdir()
    with serve_tiny_inference(model, tmp_path / "inference", max_model_len=2048) as url:
        args = GAME_ARGS | {"taskset.game": "Hangman-v0"}
        config = {"output_dir": str(tmp_path / "eval"), "model": str(model), "sampling": {"max_tokens": 16},
                  "eval": {"env": [{"id": ENV_ID, "args": args, "num_examples": 4, "rollouts_per_example": 2}]}}  # fmt: skip
        (tmp_path / "eval").mkdir()
        result, metrics = run_rlbus_eval(config, url, textarena_env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics[f"eval/{ENV_ID}/num_examples"] == 4 and metrics[f"eval/{ENV_ID}/errored_rollouts"] == 0
    assert 0.0 <= metrics[f"eval/{ENV_ID}/avg@2"] <= metrics[f"eval/{ENV_ID}/pass@2"] <= 1.0
    assert f"eval/{ENV_ID}/avg@2 = " in result.stderr and f"eval/{ENV_ID}/pass@2 = " in result.stderr
