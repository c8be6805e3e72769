"""``reverse-text``: reverse a short text character by character.

The answer goes inside ``<reversed_text>`` tags. The reward (``lcs_reward``) is
the difflib ``SequenceMatcher`` ratio between the tagged answer and the
reversed text, but only for a completion whose answer is where it ends:

- exactly one ``<reversed_text>`` and one ``</reversed_text>``, in that order;
- nothing but whitespace (or an end-of-text marker) after the closing tag;
- not truncated: the model stopped by itself before ``max_tokens``.

Anything else scores 0. Without these rules the task is gameable: a policy
that closes the tag and keeps writing (``<reversed_text>tevek</reversed_text>
en</reversed_text>niw e``, cut off at ``max_tokens``) kept the first span's
score, and RL learned to never stop (is_truncated 0.16 -> 0.97 in the CPU
quickstart). Text before the opening tag is allowed. The task is prime-rl's
reverse-text example. Texts are words and short phrases drawn from a built-in
word list with a seed, so every process that loads the environment with the
same arguments gets the same examples and nothing is downloaded.
"""

from __future__ import annotations

import random
from difflib import SequenceMatcher

from rlbus.environments.base import Environment, RolloutState, Rubric
from rlbus.environments.builtin import END_OF_TEXT

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
OPEN_TAG, CLOSE_TAG = "<reversed_text>", "</reversed_text>"


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
    """The text inside the completion's one ``<reversed_text>`` span, stripped; None unless the
    completion has exactly one opening and one closing tag and ends at the closing tag (only
    whitespace or an end-of-text marker after it)."""
    if completion.count(OPEN_TAG) != 1 or completion.count(CLOSE_TAG) != 1:
        return None
    _, _, rest = completion.partition(OPEN_TAG)
    answer, closed, after = rest.partition(CLOSE_TAG)
    if not closed or not ends_here(after):
        return None  # closed before it opened, or the model went on writing
    return answer.strip()


def ends_here(after: str) -> bool:
    """True when ``after`` (the text after the closing tag) is blank, or one end-of-text marker."""
    return after.strip() in ("", *END_OF_TEXT)


def lcs_reward(completion: str, answer: str, state: RolloutState | None = None) -> float:
    """SequenceMatcher ratio of the parsed answer and the reversed text; 0 when the completion was
    truncated or :func:`parse_reversed_text` finds no answer that ends it.

    ``state`` is the rollout's (the rubric always passes it); a caller scoring a bare text leaves
    it out and must have checked truncation itself.
    """
    if state is not None and state.is_truncated:
        return 0.0  # the model did not stop: whatever it tagged, it was not an answer it ended
    parsed = parse_reversed_text(completion)
    if parsed is None:
        return 0.0
    return SequenceMatcher(None, parsed, answer).ratio()


def load_environment(num_examples: int = 1000, seed: int = 0, min_words: int = 1, max_words: int = 4) -> Environment:
    """Reverse-text examples generated from ``seed``."""
    examples = make_examples(num_examples, seed, min_words, max_words)
    return Environment(examples, Rubric([lcs_reward]), system_prompt=SYSTEM_PROMPT)
