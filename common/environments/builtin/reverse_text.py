"""``reverse-text``: reverse a short text character by character.

The answer goes inside ``<reversed_text>`` tags; the reward is the difflib
``SequenceMatcher`` ratio between the parsed answer and the reversed text, and
0 when the tags are missing (the task of prime-rl's reverse-text example).
Texts are words and short phrases drawn from a built-in word list with a seed,
so every process that loads the environment with the same arguments gets the
same examples and nothing is downloaded.
"""

from __future__ import annotations

import random
import re
from difflib import SequenceMatcher

from rlbus.environments.base import Environment, Rubric

SYSTEM_PROMPT = "Reverse the text character-by-character. Put your answer in <reversed_text> tags."

WORDS = (
    "apple", "river", "stone", "cloud", "garden", "window", "silver", "market", "bridge", "candle", "forest",
    "pocket", "yellow", "winter", "summer", "rocket", "planet", "orange", "basket", "mirror", "pencil", "island",
    "thunder", "bottle", "butter", "castle", "dragon", "engine", "falcon", "guitar", "hammer", "jungle", "kitten",
    "ladder", "meadow", "needle", "oyster", "parrot", "quartz", "rabbit", "saddle", "tomato", "umbrella", "velvet",
    "walnut", "zebra", "anchor", "blanket", "canyon", "dinner", "feather", "glacier", "harbor", "jacket", "kettle",
    "lantern", "magnet", "napkin", "orchard", "pepper", "puzzle", "ribbon", "shadow", "teapot", "violin", "wagon",
    "blue", "green", "quick", "slow", "bright", "dark", "small", "large", "happy", "quiet", "loud", "soft", "warm",
    "cold", "early", "late", "north", "south", "east", "west", "the", "a", "of", "and", "under", "over", "near",
    "far", "red", "old", "new",
)  # fmt: skip
_ANSWER = re.compile(r"<reversed_text>(.*?)</reversed_text>", re.DOTALL)


def make_examples(num_examples: int, seed: int, min_words: int, max_words: int) -> list[dict]:
    """``num_examples`` texts of ``min_words``-``max_words`` words, the same for the same arguments."""
    validate_args(num_examples, min_words, max_words)
    rng = random.Random(f"reverse-text:{seed}")
    examples = []
    for _ in range(num_examples):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        examples.append({"prompt": text, "answer": text[::-1], "info": {"text": text}})
    return examples


def validate_args(num_examples: int, min_words: int, max_words: int, **_: object) -> None:
    """Refuse sizes no example can have; the registry calls it before anything starts (any seed is valid)."""
    if num_examples < 1 or not 1 <= min_words <= max_words:
        raise ValueError(
            f"need num_examples >= 1 and 1 <= min_words <= max_words, got num_examples={num_examples}, "
            f"min_words={min_words}, max_words={max_words}"
        )


def parse_reversed_text(completion: str) -> str | None:
    """The text inside the last ``<reversed_text>`` tags, stripped; None without them."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def lcs_reward(completion: str, answer: str) -> float:
    """SequenceMatcher ratio of the parsed answer and the reversed text; 0 without tags."""
    parsed = parse_reversed_text(completion)
    if parsed is None:
        return 0.0
    return SequenceMatcher(None, parsed, answer).ratio()


def load_environment(num_examples: int = 1000, seed: int = 0, min_words: int = 1, max_words: int = 4) -> Environment:
    """Reverse-text examples generated from ``seed``."""
    examples = make_examples(num_examples, seed, min_words, max_words)
    return Environment(examples, Rubric([lcs_reward]), system_prompt=SYSTEM_PROMPT)
