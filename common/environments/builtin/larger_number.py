"""``larger-number``: say which of two numbers is larger — a task only the reward teaches.

The user turn is two distinct integers (``"37 52"``); the answer is the position of the
larger one, ``1`` or ``2``, and nothing else. ``correct`` (weight 1) is 1 when the
completion is exactly the larger number's position (surrounding whitespace and an
end-of-text marker allowed; not truncated), else 0; ``has_answer`` (weight 0) says whether
it was a bare ``1`` or ``2`` at all. A completion that says more scores 0: the answer must
end where it ends.

What it is for: a task whose warm-up demonstrations (:func:`sft_example`,
``data.synthetic = "larger-number"``) show only the format, with a position picked at
random, so SFT on them stays at chance (~0.5) and whatever rises above it comes from the
reward. A held-out ``split = "eval"`` holds the pairs the training split never shows (one
pair in five, chosen by the pair itself, so any seed and any number of examples keep the
two apart). Measured on a 2-core CPU with the quickstart's 1M-parameter model, it is too
hard for that model: 45 RL steps of 128 rollouts left the reward at 0.48-0.53, and even
SFT on 960 correct answers left the loss at ln 2 per answer (the comparison was not
learned); a larger model is needed.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from rlbus.environments.base import Environment, RolloutState, Rubric
from rlbus.environments.builtin import without_end_of_text

SYSTEM_PROMPT = "Which number is larger? Answer 1 or 2."
"""Offered with ``system_prompt = true``; off by default, as every prompt token costs CPU time in
training and the warm-up teaches what the bare question means."""
_ANSWER = re.compile(r"\s*([12])\s*")
EVAL_EVERY = 5
"""One unordered pair in this many belongs to the eval split."""


def is_eval_pair(a: int, b: int) -> bool:
    low, high = min(a, b), max(a, b)
    return (low * 31 + high * 17) % EVAL_EVERY == 0


def validate_args(num_examples: int, min_value: int, max_value: int, split: str, **_: object) -> None:
    """Refuse arguments no example can be made from (the registry calls it before anything starts)."""
    if num_examples < 1 or not 0 <= min_value < max_value - 1:
        raise ValueError(f"need num_examples >= 1 and 0 <= min_value < max_value - 1, got num_examples="
                         f"{num_examples}, min_value={min_value}, max_value={max_value}")  # fmt: skip
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def make_pairs(num_examples: int, seed: int, min_value: int, max_value: int, split: str) -> list[tuple[int, int]]:
    """``num_examples`` ordered pairs of distinct numbers of ``split``, the same for the same arguments."""
    validate_args(num_examples, min_value, max_value, split)
    rng = random.Random(f"larger-number:{seed}:{split}")
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num_examples:
        a, b = rng.randint(min_value, max_value), rng.randint(min_value, max_value)
        if a != b and is_eval_pair(a, b) == (split == "eval"):
            pairs.append((a, b))
    return pairs


def parse_answer(completion: str) -> int | None:
    """1 or 2 when that is all the completion says (an end-of-text marker after it allowed); else None."""
    match = _ANSWER.fullmatch(without_end_of_text(completion))
    return None if match is None else int(match.group(1))


def correct(completion: str, answer: str, state: RolloutState | None = None) -> float:
    """1 for exactly the larger number's position, in the one answer the completion ends with; 0
    when truncated."""
    if state is not None and state.is_truncated:
        return 0.0
    return float(parse_answer(completion) == int(answer))


def has_answer(completion: str, state: RolloutState | None = None) -> float:
    """1 when the completion has the answer's shape (right or wrong)."""
    return float(not (state is not None and state.is_truncated) and parse_answer(completion) is not None)


def sft_example(a: int, b: int, rng: random.Random) -> dict[str, Any]:
    """A warm-up demonstration: the environment's prompt and format, the position picked at random."""
    return {
        "prompt": [{"role": "user", "content": f"{a} {b}"}],
        "completion": [{"role": "assistant", "content": str(rng.choice((1, 2)))}],
    }


def generate_sft(num_examples: int, seed: int = 0, min_value: int = 10, max_value: int = 99) -> list[dict[str, Any]]:
    """Warm-up demonstrations from training-split pairs (a seed of their own, so they are not the
    RL examples of the same run seed)."""
    rng = random.Random(f"larger-number-sft:{seed}")
    return [sft_example(a, b, rng) for a, b in make_pairs(num_examples, seed + 1_000_003, min_value, max_value,
                                                          "train")]  # fmt: skip


def load_environment(num_examples: int = 1000, seed: int = 0, min_value: int = 10, max_value: int = 99,
                     split: Literal["train", "eval"] = "train", system_prompt: bool = False) -> Environment:  # fmt: skip
    """Pairs of distinct integers in ``[min_value, max_value]`` from ``split``, generated from ``seed``."""
    pairs = make_pairs(num_examples, seed, min_value, max_value, split)
    examples = [{"prompt": f"{a} {b}", "answer": "1" if a > b else "2"} for a, b in pairs]
    rubric = Rubric([correct, has_answer], [1.0, 0.0])
    return Environment(examples, rubric, system_prompt=SYSTEM_PROMPT if system_prompt else None)
