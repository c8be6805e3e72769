"""``first-letter``: answer with the first letter of a made-up word — where RL beats imitation.

The user turn is a random lower-case string of 3-6 letters (``"kqzt"``); the answer is its
first letter and nothing else. ``correct`` (weight 1) is 1 when the completion is exactly that
letter (surrounding whitespace and an end-of-text marker allowed; not truncated), else 0. A
completion that says more, or anything else, scores 0: the answer must end where it ends, so
there is nothing to game. ``is_last_letter`` (weight 0) counts the teacher's mistake below.

What it is for: the CPU quickstart's demonstration that RL does what SFT cannot. The warm-up
demonstrations (:func:`generate_sft`, ``data.synthetic = "first-letter"``) come from a flawed
teacher that answers the *last* letter 60% of the time (``TEACHER_FIRST_SHARE``), a systematic
mistake. Imitation learns the teacher's mixture — more SFT only copies it better, and greedy
decoding then follows the teacher's majority — while the reward pays only the first letter, so
RL moves the policy to the right answer. The words are random strings, never a word list, so a
held-out ``split = "eval"`` (one string in five, chosen by the string itself) measures the skill,
not memory. Measured on a 2-core CPU: README, "CPU quickstart".
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Any, Literal

from rlbus.environments.base import Environment, RolloutState, Rubric
from rlbus.environments.builtin import without_end_of_text

SYSTEM_PROMPT = "Answer with the first letter of the word."
"""Offered with ``system_prompt = true``; off by default: the warm-up teaches what the bare word means."""
LETTERS = "abcdefghijklmnopqrstuvwxyz"
EVAL_EVERY = 5
"""One string in this many belongs to the eval split."""
TEACHER_FIRST_SHARE = 0.4
"""How often the warm-up's teacher answers right (the first letter); otherwise it gives the last."""
_ANSWER = re.compile(r"\s*([a-z])\s*")


def is_eval_word(word: str) -> bool:
    return zlib.crc32(word.encode()) % EVAL_EVERY == 0


def validate_args(num_examples: int, min_length: int, max_length: int, split: str, **_: object) -> None:
    """Refuse arguments no example can be made from (the registry calls it before anything starts)."""
    if num_examples < 1 or not 2 <= min_length <= max_length:
        raise ValueError(f"need num_examples >= 1 and 2 <= min_length <= max_length, got num_examples="
                         f"{num_examples}, min_length={min_length}, max_length={max_length}")  # fmt: skip
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def make_words(num_examples: int, seed: int, min_length: int, max_length: int, split: str) -> list[str]:
    """``num_examples`` random strings of ``split``, the same for the same arguments."""
    validate_args(num_examples, min_length, max_length, split)
    rng = random.Random(f"first-letter:{seed}:{split}")
    words: list[str] = []
    while len(words) < num_examples:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_length, max_length)))
        if is_eval_word(word) == (split == "eval"):
            words.append(word)
    return words


def parse_answer(completion: str) -> str | None:
    """The letter, when one letter is all the completion says (an end-of-text marker after it allowed)."""
    match = _ANSWER.fullmatch(without_end_of_text(completion))
    return None if match is None else match.group(1)


def correct(completion: str, answer: str, state: RolloutState | None = None) -> float:
    """1 for exactly the word's first letter as the whole answer; 0 when truncated."""
    if state is not None and state.is_truncated:
        return 0.0
    return float(parse_answer(completion) == answer)


def is_last_letter(completion: str, info: dict[str, Any], state: RolloutState | None = None) -> float:
    """1 when the answer is the word's last letter (the teacher's mistake) and not also its first."""
    word = info["word"]
    truncated = state is not None and state.is_truncated
    return float(not truncated and word[0] != word[-1] and parse_answer(completion) == word[-1])


def teacher_answer(word: str, rng: random.Random) -> str:
    """The flawed teacher: the first letter ``TEACHER_FIRST_SHARE`` of the time, else the last."""
    return word[0] if rng.random() < TEACHER_FIRST_SHARE else word[-1]


def generate_sft(num_examples: int, seed: int = 0, min_length: int = 3, max_length: int = 6) -> list[dict[str, Any]]:
    """The teacher's warm-up demonstrations on training-split words (a seed of their own, so they
    are not the RL examples of the same run seed)."""
    rng = random.Random(f"first-letter-sft:{seed}")
    words = make_words(num_examples, seed + 1_000_003, min_length, max_length, "train")
    return [{"prompt": [{"role": "user", "content": word}],
             "completion": [{"role": "assistant", "content": teacher_answer(word, rng)}]} for word in words]  # fmt: skip


def load_environment(num_examples: int = 1000, seed: int = 0, min_length: int = 3, max_length: int = 6,
                     split: Literal["train", "eval"] = "train", system_prompt: bool = False) -> Environment:  # fmt: skip
    """Random strings of ``min_length``-``max_length`` letters from ``split``, generated from ``seed``."""
    words = make_words(num_examples, seed, min_length, max_length, split)
    examples = [{"prompt": word, "answer": word[0], "info": {"word": word}} for word in words]
    rubric = Rubric([correct, is_last_letter], [1.0, 0.0])
    return Environment(examples, rubric, system_prompt=SYSTEM_PROMPT if system_prompt else None)
